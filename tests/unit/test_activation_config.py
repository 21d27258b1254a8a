"""`GPTConfig.activation` travels wherever the config does: the wire (ModelConfig), the run
folder's config.json; configs from before the field mean exact GELU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lmps.client import model_io
from lmps.core.data import train_tokenizer
from lmps.core.model import ACTIVATIONS, GPT, GPTConfig, preset
from lmps.rpc import codec
from lmps.v1 import job_pb2

CFG = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=300)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_round_trips_through_the_wire(activation: str) -> None:
    config = dataclasses.replace(CFG, activation=activation)  # type: ignore[arg-type]
    m = codec.model_to_proto(config)
    assert job_pb2.Activation.Name(m.activation) == activation.upper()
    assert codec.model_from_proto(job_pb2.ModelConfig.FromString(m.SerializeToString())) == config


def test_a_spec_without_the_activation_means_gelu_and_an_unknown_one_is_refused() -> None:
    m = codec.model_to_proto(preset("gpt2"))
    assert codec.model_from_proto(m).activation == "gelu_tanh"
    m.ClearField("activation")  # what a client from before the field sends
    assert m.activation == job_pb2.ACTIVATION_UNSPECIFIED
    assert codec.model_from_proto(m).activation == "gelu"
    m.activation = 99  # type: ignore[assignment]
    with pytest.raises(ValueError, match="activation must be one of gelu, gelu_tanh"):
        codec.model_from_proto(m)


def test_config_json_carries_the_activation_and_old_files_load_as_gelu(tmp_path: Path) -> None:
    config = dataclasses.replace(CFG, activation="gelu_tanh")
    tokenizer = train_tokenizer(["some words to learn a vocabulary from"] * 4, 300)
    model_io.save(model_io.TrainedModel(GPT(config), config, tokenizer), tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    assert fields["activation"] == "gelu_tanh"
    assert model_io.load(tmp_path).config == config
    del fields["activation"]  # a model saved before the option existed
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert model_io.load(tmp_path).config.activation == "gelu"
