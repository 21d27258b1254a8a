"""End to end on the bundled corpus: loss falls, the exported model loads and generates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from lmps.client import model_io
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.client.train import TrainOptions, train

pytestmark = pytest.mark.cluster


def test_train_on_pydoc_loss_falls_and_model_generates(tmp_path: Path) -> None:
    spec = ClusterSpec(servers=2, workers=2, run_dir=str(tmp_path / "logs"))
    out = tmp_path / "model"
    with LocalCluster(spec) as cluster:
        opts = TrainOptions(
            coordinator=cluster.coordinator,
            data="builtin:pydoc",
            preset="tiny",
            vocab_size=1024,
            block_size=64,
            epochs=2,
            batch_size=16,
            lr=3e-3,
            warmup_steps=5,
            out=str(out),
            cache_dir=str(tmp_path / "cache"),
            sample_prompt="The for statement",
        )
        report = train(opts, Console(width=100, force_terminal=False))
        codes = cluster.stop()
    assert all(code == 0 for code in codes.values()), codes
    epochs = report["epochs"]
    assert isinstance(epochs, list) and len(epochs) == 2
    first = float(report["initial_eval_loss"])  # type: ignore[arg-type]
    # A uniform guess over the vocabulary scores ln(V); training must beat init and improve.
    assert math.isclose(first, math.log(1024), rel_tol=0.1)
    assert epochs[0]["eval_loss"] < first - 0.5
    assert epochs[1]["eval_loss"] < epochs[0]["eval_loss"]
    assert epochs[1]["end_step"] > epochs[0]["end_step"] > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["epochs"][1]["eval_loss"] == epochs[1]["eval_loss"]
    # The schedule the coordinator sized at submit ends exactly where training ends: no
    # steps past total_steps (at min_lr), none missing.
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (job_line,) = [r for r in lines if r["kind"] == "job"]
    assert job_line["total_steps"] == epochs[1]["end_step"]

    loaded = model_io.load(out)
    assert loaded.config.vocab_size <= 1024 and loaded.config.block_size == 64
    text = model_io.sample(loaded, "The for statement", max_tokens=30, temperature=0.0)
    assert text.startswith("The for statement") and len(text) > len("The for statement")
    # Greedy decoding from the saved model is deterministic.
    assert model_io.sample(loaded, "The for statement", max_tokens=30, temperature=0.0) == text
