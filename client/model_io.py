"""Fetch a trained model from a cluster, save it, load it back.

A saved model is a folder: `model.safetensors` (weights), `config.json` (GPTConfig) and
`tokenizer.json` (the `tokenizers` tokenizer the job was trained with).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from lmps.core.model import GPT, GPTConfig, decay_mask
from lmps.core.partition import ParamInfo, assemble, validate_cover
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc


@dataclass
class TrainedModel:
    model: GPT
    config: GPTConfig
    tokenizer: Tokenizer | None  # None when the job was submitted without one
    version: int = 0


def fetch_model(coordinator: str, job_id: str = "") -> TrainedModel:
    """Stream a job's parameters from the cluster (ExportModel) into a GPT."""
    with open_channel(coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        stream: Iterator[coordinator_pb2.ExportModelResponse] = stub.ExportModel(
            coordinator_pb2.ExportModelRequest(job_id=job_id), timeout=600, wait_for_ready=True
        )
        first = next(stream)
        header = first.header
        values = {msg.shard.shard_id: codec.decode(msg.shard.tensor) for msg in stream}
    config = codec.model_from_proto(header.model)
    shards = [codec.shard_from_proto(s) for s in header.shards]
    model = GPT(config)
    params = dict(model.named_parameters())
    validate_cover(
        shards, [ParamInfo(n, tuple(p.shape), decay_mask(n, p)) for n, p in params.items()]
    )
    full = assemble(shards, values)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(full[name])
    tokenizer = Tokenizer.from_str(header.tokenizer_json) if header.tokenizer_json else None
    return TrainedModel(model, config, tokenizer, int(header.version))


def save(trained: TrainedModel, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_model(trained.model, str(out / "model.safetensors"))  # handles the tied wte/lm_head
    (out / "config.json").write_text(
        json.dumps(dataclasses.asdict(trained.config), indent=2) + "\n"
    )
    if trained.tokenizer is None:
        raise ValueError(
            "this job has no tokenizer; submit it with JobSpec.tokenizer_json to save it"
        )
    trained.tokenizer.save(str(out / "tokenizer.json"))


def load(path: Path) -> TrainedModel:
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (path / name).exists():
            raise FileNotFoundError(
                f"{path / name} is missing: pass a folder written by `lmps train --out`"
            )
    config = GPTConfig(**json.loads((path / "config.json").read_text()))
    model = GPT(config)
    load_model(model, str(path / "model.safetensors"))
    return TrainedModel(model, config, Tokenizer.from_file(str(path / "tokenizer.json")))


def sample(
    trained: TrainedModel,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> str:
    from lmps.core.model import generate

    if trained.tokenizer is None:
        raise ValueError("this model has no tokenizer to encode the prompt with")
    ids = trained.tokenizer.encode(prompt).ids or [0]
    idx = torch.tensor([ids], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    trained.model.eval()
    out = generate(
        trained.model, idx, max_tokens, temperature=temperature, top_k=top_k, generator=g
    )
    text: str = trained.tokenizer.decode(out[0].tolist())
    return text
