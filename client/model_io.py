"""Fetch a trained model from a cluster, save it, load it back.

A saved model is a folder: `model.safetensors` (weights), `config.json` (GPTConfig),
`tokenizer.json` (the `tokenizers` tokenizer the job was trained with) and, for a fine-tuned
model, `task.json` ({"task": "classify" | "sft", "labels": [class names]}; absent: "lm").
`--init-from` also takes `hf:DIR`, a Hugging Face GPT-2 folder (`lmps.client.hf_io`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from lmps.client import run_log
from lmps.core.model import GPT, GPTConfig, decay_mask
from lmps.core.partition import ParamInfo, assemble, validate_cover
from lmps.core.tasks import TASK_NAMES, TaskName
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc


@dataclass
class TrainedModel:
    model: GPT
    config: GPTConfig
    tokenizer: Tokenizer | None  # None when the job was submitted without one
    version: int = 0
    task: TaskName = "lm"
    labels: tuple[str, ...] = ()  # classify: class names, index = class id


def fetch_model(coordinator: str, job_id: str = "", wait: bool = True) -> TrainedModel:
    """Stream a job's parameters from the cluster (ExportModel) into a GPT. `wait`: ride out
    a coordinator that is restarting (`lmps train`, which just talked to it); without it a
    missing coordinator is UNAVAILABLE at once (`lmps generate`, which would otherwise sit
    silent until the deadline)."""
    with open_channel(coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        stream: Iterator[coordinator_pb2.ExportModelResponse] = stub.ExportModel(
            coordinator_pb2.ExportModelRequest(job_id=job_id), timeout=600, wait_for_ready=wait
        )
        first = next(stream)
        header = first.header
        values = {msg.shard.shard_id: codec.decode(msg.shard.tensor) for msg in stream}
    config = codec.model_from_proto(header.model)
    shards = [codec.shard_from_proto(s) for s in header.shards]
    model = GPT(config)
    params = dict(model.named_parameters())
    # The job's own weight-decay flags (a frozen backbone has none): only the cover matters.
    decays = {s.param: s.weight_decay for s in shards}
    validate_cover(
        shards,
        [ParamInfo(n, tuple(p.shape), decays.get(n, decay_mask(n, p))) for n, p in params.items()],
    )
    full = assemble(shards, values)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(full[name])
    tokenizer = Tokenizer.from_str(header.tokenizer_json) if header.tokenizer_json else None
    return TrainedModel(
        model,
        config,
        tokenizer,
        int(header.version),
        task=codec.task_from_proto(header.task),
        labels=tuple(header.labels),
    )


def open_model(
    model_dir: str | None, job: str | None, coordinator: str
) -> tuple[TrainedModel, str]:
    """The model a command's `--model DIR` or `--job JOB` names (neither: the cluster's
    latest job), and how to name it in a message (DIR, or "job JOB")."""
    if model_dir:
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(
                f"--model {model_dir}: no such folder; pass a run folder written by `lmps train`"
            )
        return load(Path(model_dir)), model_dir
    trained = fetch_model(coordinator, job or "", wait=False)
    return trained, f"job {job}" if job else "the latest job"


def save(trained: TrainedModel, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_model(trained.model, str(out / "model.safetensors"))  # handles the tied wte/lm_head
    # safetensors writes through a temp file (0600): give it the mode of the other files.
    run_log.fix_mode(out / "model.safetensors")
    (out / "config.json").write_text(
        json.dumps(dataclasses.asdict(trained.config), indent=2) + "\n"
    )
    if trained.tokenizer is None:
        raise ValueError(
            "this job has no tokenizer; submit it with JobSpec.tokenizer_json to save it"
        )
    trained.tokenizer.save(str(out / "tokenizer.json"))
    task_file = out / "task.json"
    if trained.task != "lm":
        task_file.write_text(
            json.dumps({"task": trained.task, "labels": list(trained.labels)}, indent=2) + "\n"
        )
    elif task_file.exists():
        task_file.unlink()  # a folder reused for a language model


def check(path: Path) -> GPTConfig:
    """Cheap checks of a saved model folder, without loading the weights: the three files are
    there, config.json is a model config, model.safetensors has a whole header and is as long
    as it says, tokenizer.json parses. A failure is one line naming the file."""
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (path / name).exists():
            raise FileNotFoundError(
                f"{path / name} is missing: pass a folder written by `lmps train --out`"
            )
    config = _read_config(path / "config.json")
    weights = path / "model.safetensors"
    try:
        with safe_open(str(weights), "pt"):
            pass
    except Exception as err:  # safetensors' own error type
        raise ValueError(_bad_weights(weights, err)) from None
    _read_tokenizer(path / "tokenizer.json")
    return config


def check_init(source: str) -> GPTConfig:
    """`check` for what --init-from names: an lmps run folder, or `hf:DIR`."""
    if source.startswith("hf:"):
        from lmps.client import hf_io

        return hf_io.check(Path(source.removeprefix("hf:")))
    return check(Path(source))


def load_init(source: str) -> TrainedModel:
    """`load` for what --init-from names: an lmps run folder, or `hf:DIR`."""
    if source.startswith("hf:"):
        from lmps.client import hf_io

        return TrainedModel(*hf_io.load(Path(source.removeprefix("hf:"))))
    return load(Path(source))


def load(path: Path) -> TrainedModel:
    config = check(path)
    model = GPT(config)
    weights = path / "model.safetensors"
    try:
        load_model(model, str(weights))
    except Exception as err:  # safetensors' own error type, or a shape/key mismatch
        raise ValueError(_bad_weights(weights, err)) from None
    task, labels = _read_task(path / "task.json", config)
    return TrainedModel(
        model, config, _read_tokenizer(path / "tokenizer.json"), task=task, labels=labels
    )


def _read_task(path: Path, config: GPTConfig) -> tuple[TaskName, tuple[str, ...]]:
    """task.json (absent: a language model); a ValueError naming the file otherwise."""
    if not path.exists():
        if config.num_labels:
            raise ValueError(f"{path} is missing: config.json has a {config.num_labels}-class head")
        return "lm", ()
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({_one_line(err)})") from None
    task = fields.get("task") if isinstance(fields, dict) else None
    labels = fields.get("labels", []) if isinstance(fields, dict) else None
    if task not in TASK_NAMES or not isinstance(labels, list):
        raise ValueError(
            f'{path}: expected {{"task": one of {", ".join(TASK_NAMES)}, "labels": [...]}}'
        )
    if not all(isinstance(x, str) for x in labels) or len(labels) != config.num_labels:
        raise ValueError(
            f"{path}: needs {config.num_labels} string labels (config.json's num_labels), "
            f"got {len(labels)}"
        )
    return cast(TaskName, task), tuple(labels)


def _bad_weights(path: Path, err: BaseException) -> str:
    return (
        f"{path}: cannot load the weights ({_one_line(err)}); "
        "the file is truncated, corrupt or from another model"
    )


def _read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception
        raise ValueError(f"{path}: not a tokenizer ({_one_line(err)})") from None


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_config(path: Path) -> GPTConfig:
    """config.json as a GPTConfig; anything else is a ValueError naming the file."""
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a JSON object of model settings")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown model setting(s) {', '.join(unknown)}")
    try:
        return GPTConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {_one_line(err)}") from None


def sample(
    trained: TrainedModel,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> str:
    """The prompt and its continuation (`lmps train --sample-prompt`); `lmps generate`
    streams it with every setting through `lmps.client.generation`."""
    from lmps.client.generation import generate_text
    from lmps.core.generation import SamplingSettings

    settings = SamplingSettings(
        max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed
    )
    return prompt + generate_text(trained.model, trained.tokenizer, prompt, settings).text
