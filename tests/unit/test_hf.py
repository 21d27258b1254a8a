"""Issue 11, Hugging Face GPT-2 in and out, against the real `transformers` (nothing
downloaded): a small random `GPT2LMHeadModel` + tokenizer imported into lmps gives
transformers' logits; a model exported by lmps loads with `from_pretrained` without missing
or unexpected keys and gives lmps' logits; training steps match step for step; the
tokenizers agree on ids; refusals are one line naming the culprit."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lmps.client import hf_io, model_io
from lmps.core import hf
from lmps.core.data import EOT, train_tokenizer
from lmps.core.model import GPT, PRESETS, GPTConfig
from tests.hf_models import (
    TEXT,
    TEXTS,
    assert_no_loading_issues,
    close,
    far_lmps_model,
    hf_logits,
    load_quietly,
    make_hf_dir,
    report_logits_diffs,  # noqa: F401 (autouse: prints the worst differences)
)

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def tokens(vocab: int, seed: int = 0, shape: tuple[int, int] = (3, 16)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def lmps_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out, _ = model.eval()(idx)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "gpt2-test")


# -- the table --------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_the_table_names_every_parameter_and_transposes_exactly_the_conv1d_weights(
    tie: bool,
) -> None:
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, tie_embeddings=tie
    )
    layout = hf.param_layout(config)
    assert set(layout) == {n for n, _ in GPT(config).named_parameters()}
    hf_model = GPT2LMHeadModel(transformers.GPT2Config(**hf.to_hf_config(config)))
    conv1d = {f"{n}.weight" for n, m in hf_model.named_modules() if isinstance(m, Conv1D)}
    assert {n for n, transposed in layout.items() if transposed} == conv1d
    assert len(conv1d) == 4 * config.n_layer
    converted = hf.to_hf(dict(GPT(config).named_parameters()), config)
    want = hf_model.state_dict()
    assert set(converted) == set(want)
    assert {n: tuple(t.shape) for n, t in converted.items()} == {
        n: tuple(t.shape) for n, t in want.items()
    }


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_gpt2_config(name: str) -> None:
    config = PRESETS[name]
    fields = transformers.GPT2Config(**hf.to_hf_config(config, eot_id=0)).to_dict()
    assert hf.from_hf_config(fields) == config
    assert fields["activation_function"] == ("gelu_pytorch_tanh" if name == "gpt2" else "gelu")
    assert fields["n_positions"] == config.block_size


# -- in ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("activation", "tie"),
    [("gelu_new", True), ("gelu", True), ("gelu_pytorch_tanh", True), ("gelu_new", False)],
)
def test_import_gives_transformers_logits(
    tmp_path: Path, activation: str, tie: bool, hf_dir: Path
) -> None:
    path = hf_dir if (activation, tie) == ("gelu_new", True) else tmp_path / "m"
    if path != hf_dir:
        make_hf_dir(path, activation=activation, tie=tie, seed=1)
    reference = GPT2LMHeadModel.from_pretrained(str(path))
    trained = model_io.load_init(f"hf:{path}")
    assert trained.config.tie_embeddings is tie
    assert trained.config.activation == hf.ACTIVATION_FROM_HF[activation]
    assert trained.config.block_size == 16 and trained.config.dropout == 0.1
    idx = tokens(trained.config.vocab_size)
    close(
        f"import ({activation}, tied {tie})",
        lmps_logits(trained.model, idx),
        hf_logits(reference, idx),
    )


def test_import_then_export_gives_back_the_same_tensors(tmp_path: Path, hf_dir: Path) -> None:
    trained = model_io.load_init(f"hf:{hf_dir}")
    hf_io.save(trained, tmp_path / "out")
    before = GPT2LMHeadModel.from_pretrained(str(hf_dir)).state_dict()
    after = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    old = json.loads((hf_dir / "config.json").read_text())
    new = json.loads((tmp_path / "out" / "config.json").read_text())
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "tie_word_embeddings")
    assert {k: new[k] for k in keys} == {k: old[k] for k in keys}
    # GPT-2's "gelu_new" comes back as the same function under the name of lmps' kernel.
    assert (old["activation_function"], new["activation_function"]) == (
        "gelu_new",
        "gelu_pytorch_tanh",
    )
    assert new["bos_token_id"] == new["eos_token_id"] == old["eos_token_id"]


# -- out --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("activation", "tie"), [("gelu_tanh", True), ("gelu", True), ("gelu_tanh", False)]
)
def test_export_loads_without_warnings_and_gives_lmps_logits(
    tmp_path: Path, activation: str, tie: bool
) -> None:
    trained = far_lmps_model(5, block_size=16, tie_embeddings=tie, activation=activation)
    model, config = trained.model, trained.config
    out = tmp_path / "hf"
    hf_io.save(trained, out)
    loaded, info, said = load_quietly(GPT2LMHeadModel, out)
    assert_no_loading_issues(info)
    assert said == []
    assert loaded.config.activation_function == hf.ACTIVATION_TO_HF[activation]
    assert loaded.config.tie_word_embeddings is tie
    idx = tokens(config.vocab_size, seed=2)
    close(f"export ({activation}, tied {tie})", hf_logits(loaded, idx), lmps_logits(model, idx))
    # The other GELU would not do: the activation is what makes the export exact.
    other = "gelu" if activation == "gelu_tanh" else "gelu_pytorch_tanh"
    loaded.config.activation_function = other
    wrong = GPT2LMHeadModel(loaded.config)
    wrong.load_state_dict(loaded.state_dict())
    assert not torch.allclose(hf_logits(wrong, idx), lmps_logits(model, idx))


def test_fine_tuning_steps_match_transformers_step_for_step(tmp_path: Path) -> None:
    """Same weights, same batches, plain SGD: lmps' gradients (tied head included) are
    transformers', so after three steps the weights agree."""
    # GPT-2 checkpoints say "gelu_new", the tanh GELU in elementwise ops, which rounds
    # differently from torch's kernel; this one uses the kernel, so only the layout differs.
    path = make_hf_dir(tmp_path / "m", activation="gelu_pytorch_tanh", dropout=0.0, seed=2)
    reference = GPT2LMHeadModel.from_pretrained(str(path)).train()
    trained = model_io.load_init(f"hf:{path}")
    model = trained.model.train()
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        seq = tokens(trained.config.vocab_size, seed=10 + step, shape=(4, 17))
        logits = reference(seq[:, :-1]).logits
        ref_loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        _, loss = model(seq[:, :-1], seq[:, 1:])
        assert loss is not None
        torch.testing.assert_close(loss, ref_loss)
        for o, value in ((opt_ref, ref_loss), (opt, loss)):
            o.zero_grad()
            value.backward()
            o.step()
    mine = hf.to_hf(dict(model.named_parameters()), trained.config)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(mine[name], value, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]
    hf_io.save(trained, tmp_path / "out")
    idx = tokens(trained.config.vocab_size, seed=3)
    exported = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out"))
    close("after 3 steps, exported", hf_logits(exported, idx), lmps_logits(model, idx))
    close(
        "after 3 steps, vs transformers' own", hf_logits(exported, idx), hf_logits(reference, idx)
    )


# -- tokenizers -------------------------------------------------------------------------------


def ids_hf(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def test_exported_tokenizer_encodes_like_lmps(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(TEXT.splitlines(), 300)  # lmps' own: <|endoftext|> is id 0
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=300)
    hf_io.save(model_io.TrainedModel(GPT(config), config, tokenizer), tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in [*TEXTS, TEXT[:2000]]:
        assert ids_hf(auto, text) == tokenizer.encode(text).ids, text
        assert auto.decode(tokenizer.encode(text).ids) == text
    assert auto.eos_token == auto.bos_token == EOT and auto.eos_token_id == 0
    assert auto.model_max_length == 16
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["eos_token_id"] == saved["bos_token_id"] == 0


def test_imported_tokenizer_encodes_like_transformers(tmp_path: Path, hf_dir: Path) -> None:
    auto = AutoTokenizer.from_pretrained(str(hf_dir))
    mine = hf_io.read_tokenizer(hf_dir)
    # Only the slow tokenizer's files: vocab.json + merges.txt, built with `tokenizers`.
    slow = tmp_path / "slow"
    slow.mkdir()
    mine.model.save(str(slow))  # merges.txt, and vocab.json without the added token
    vocab = mine.get_vocab(with_added_tokens=True)  # GPT-2's vocab.json has <|endoftext|>
    (slow / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    shutil.copy(hf_dir / "tokenizer_config.json", slow)
    built = hf_io.read_tokenizer(slow)
    assert sorted(p.name for p in slow.iterdir()) == [
        "merges.txt",
        "tokenizer_config.json",
        "vocab.json",
    ]
    for text in [*TEXTS, TEXT[:2000]]:
        want = ids_hf(auto, text)
        assert mine.encode(text).ids == want, text
        assert built.encode(text).ids == want, text
    assert mine.token_to_id(EOT) == built.token_to_id(EOT) == mine.get_vocab_size() - 1


# -- refusals ---------------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo[ValueError], *needles: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


def edit_config(path: Path, **changes: Any) -> None:
    fields = json.loads((path / "config.json").read_text())
    fields.update(changes)
    (path / "config.json").write_text(json.dumps(fields))


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"model_type": "llama"}, ("model_type 'llama' is not GPT-2",)),
        ({"n_inner": 100}, ("n_inner 100", "4 * n_embd = 128")),
        ({"layer_norm_epsilon": 1e-6}, ("layer_norm_epsilon 1e-06",)),
        ({"activation_function": "relu"}, ("activation_function 'relu'",)),
        ({"scale_attn_by_inverse_layer_idx": True}, ("scale_attn_by_inverse_layer_idx",)),
        ({"n_head": 3}, ("divisible by n_head (3)",)),
    ],
)
def test_configs_lmps_cannot_run_are_refused(
    tmp_path: Path, hf_dir: Path, changes: dict[str, Any], needles: tuple[str, ...]
) -> None:
    path = tmp_path / "m"
    shutil.copytree(hf_dir, path)
    edit_config(path, **changes)
    with pytest.raises(ValueError) as err:
        hf_io.check(path)
    one_line(err, str(path / "config.json"), *needles)


def test_missing_folders_and_files_are_named(tmp_path: Path, hf_dir: Path) -> None:
    with pytest.raises(ValueError) as err:
        hf_io.check(tmp_path / "nope")
    one_line(err, f"hf:{tmp_path / 'nope'}: no such folder", "save_pretrained")
    for gone, needle in (
        ("config.json", "config.json is missing"),
        ("model.safetensors", "no weights"),
        ("tokenizer.json", "no tokenizer"),
    ):
        path = tmp_path / gone
        shutil.copytree(hf_dir, path)
        (path / gone).unlink()
        with pytest.raises(ValueError) as err:
            hf_io.check(path)
        one_line(err, str(path), needle)


def test_incompatible_weights_and_tokenizers_are_refused(tmp_path: Path, hf_dir: Path) -> None:
    wider = tmp_path / "wider"
    shutil.copytree(hf_dir, wider)
    edit_config(wider, n_embd=64)  # the weights are 32 wide
    with pytest.raises(ValueError) as err:
        hf_io.load(wider)
    one_line(err, f"hf:{wider}", "weights")
    small = tmp_path / "small"
    shutil.copytree(hf_dir, small)
    edit_config(small, vocab_size=100)  # fewer embeddings than the tokenizer has tokens
    with pytest.raises(ValueError) as err:
        hf_io.load(small)
    one_line(err, f"hf:{small}", "incompatible tokenizer", "only 100 embeddings")


def test_a_model_without_biases_has_no_gpt2_form(tmp_path: Path) -> None:
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=300, bias=False)
    tokenizer = train_tokenizer(TEXT.splitlines(), 300)
    with pytest.raises(ValueError) as err:
        hf_io.save(model_io.TrainedModel(GPT(config), config, tokenizer), tmp_path / "o")
    one_line(err, "cannot export to Hugging Face", "no biases")
    assert not (tmp_path / "o").exists()


def test_without_transformers_the_refusal_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, hf_dir: Path
) -> None:
    real = hf_io.importlib.util.find_spec
    monkeypatch.setattr(
        hf_io.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transformers" else real(name, *a),
    )
    with pytest.raises(ValueError) as err:
        hf_io.check(hf_dir)
    one_line(err, "needs the transformers package", "pip install 'lmps[hf]'")


def test_the_default_gpt2_config_is_the_gpt2_preset() -> None:
    """GPT-2 small's config (transformers' defaults) is lmps' gpt2 preset, unpadded; the
    three dropout probabilities become the largest."""
    fields = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.2, attn_pdrop=0.1).to_dict()
    config = hf.from_hf_config(fields)
    assert config == dataclasses.replace(PRESETS["gpt2"], vocab_size=50257, dropout=0.2)
