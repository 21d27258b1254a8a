"""The run folder's writers: metrics.jsonl, loss.png, file modes, the progress lines and
`lmps report`'s summary (issue 8, "outputs people look at")."""

from __future__ import annotations

import io
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from lmps.client import model_io, run_log
from lmps.client.progress import RunProgress
from lmps.client.report import render, summarize
from lmps.client.run_log import MetricsLog, RunRecorder, StepAggregator, StepRecord
from lmps.core.data import train_tokenizer
from lmps.core.model import GPT, preset
from lmps.v1 import job_pb2

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def umask_027() -> Iterator[int]:
    old = os.umask(0o027)
    try:
        yield 0o640
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def event(step: int, worker: str, loss: float = 2.0, tokens: int = 100) -> job_pb2.StepEvent:
    return job_pb2.StepEvent(
        worker_id=worker,
        step=step,
        loss=loss,
        tokens=tokens,
        tokens_per_s=1000.0,
        compute_s=0.010,
        pull_s=0.002,
        push_s=0.004,
    )


def test_file_mode_is_0666_less_the_umask(umask_027: int) -> None:
    assert run_log.file_mode() == umask_027
    os.umask(0o002)
    assert run_log.file_mode() == 0o664


def test_saved_model_files_all_get_the_umask_mode(tmp_path: Path, umask_027: int) -> None:
    config = preset("tiny", 300)
    tokenizer = train_tokenizer(["some text to learn a few merges from"] * 20, 300)
    model_io.save(model_io.TrainedModel(GPT(config), config, tokenizer), tmp_path)
    modes = {p.name: mode(p) for p in tmp_path.iterdir()}
    # safetensors writes through a temp file, which would leave 0600
    assert modes == dict.fromkeys(
        ["model.safetensors", "config.json", "tokenizer.json"], umask_027
    ), modes


def test_aggregator_makes_one_record_per_global_step() -> None:
    agg = StepAggregator(epoch=1, workers=2, lr=lambda s: 0.1 * (s + 1))
    assert agg.add(event(0, "w1", loss=2.0)) == []
    (rec,) = agg.add(event(0, "w2", loss=4.0))
    assert rec.step == 1 and rec.epoch == 1 and rec.workers == 2
    assert rec.loss == 3.0 and rec.tokens == 200 and rec.tokens_per_s == 2000.0
    assert rec.lr == pytest.approx(0.1)  # the lr of the 0-based step the update applied
    assert rec.compute_ms == pytest.approx(10.0) and rec.push_ms == pytest.approx(4.0)
    assert rec.grad_norm is None
    # A worker lost after step 1: step 1 completes once step 3 shows up.
    assert agg.add(event(1, "w1")) == []
    assert agg.add(event(2, "w1")) == []
    done = agg.add(event(3, "w1"))
    assert [r.step for r in done] == [2] and done[0].workers == 1
    assert agg.add(event(0, "w2")) == []  # very late: dropped
    assert [r.step for r in agg.flush()] == [3, 4]


def test_metrics_log_lines_and_nan_as_null(tmp_path: Path, umask_027: int) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(path)
    log.job("job-1", epochs=2, total_steps=10, start_step=0)
    log.eval(epoch=0, step=0, eval_loss=5.0, perplexity=148.4)
    rec = StepRecord(1, 1, 4.5, 1e-3, 64, 500.0, 1.0, 2.0, 3.0, 2)
    log.step(rec)
    log.eval(epoch=1, step=5, eval_loss=float("nan"), perplexity=float("nan"), train_loss=4.0)
    log.close()
    assert mode(path) == umask_027
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["job", "eval", "step", "eval"]
    step = rows[2]
    for key in ("step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"):
        assert key in step, key
    assert {"pull_ms", "compute_ms", "push_ms"} <= set(step)
    assert step["grad_norm"] is None and step["lr"] == 1e-3
    assert rows[3]["eval_loss"] is None and rows[3]["perplexity"] is None
    # A line cut short by a killed writer is skipped when read back.
    with path.open("a") as f:
        f.write('{"kind": "st')
    assert len(run_log.read_metrics(path)) == 4


def test_recorder_writes_steps_evals_and_the_plot(tmp_path: Path, umask_027: int) -> None:
    seen: list[StepRecord] = []
    rec = RunRecorder(tmp_path, lr=lambda s: 0.01, on_step=seen.append)
    rec.metrics.job("job-1", epochs=1, total_steps=3, start_step=0)
    rec.metrics.eval(epoch=0, step=0, eval_loss=5.7, perplexity=300.0)
    rec.epoch_started(0, workers=2)
    for s in range(3):
        for w in ("w1", "w2"):
            rec.step(event(s, w, loss=5.0 - s))
    summary = job_pb2.EpochSummary(
        epoch=0, end_step=3, train_loss=4.0, eval_loss=3.9, eval_perplexity=49.4, tokens_per_s=9.0
    )
    plot = rec.epoch_ended(summary)
    rec.close()
    assert [r.step for r in seen] == [1, 2, 3]
    assert plot == tmp_path / "loss.png"
    assert plot.read_bytes().startswith(PNG) and mode(plot) == umask_027
    rows = run_log.read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1] == {**rows[-1], "kind": "eval", "epoch": 1, "step": 3, "train_loss": 4.0}

    summary_ = summarize(tmp_path)
    assert summary_.job_id == "job-1" and summary_.steps == 3 and summary_.epochs_done == 1
    assert summary_.eval_loss == 3.9 and summary_.initial_eval_loss == 5.7
    assert summary_.tokens == 600 and summary_.plot == plot and not summary_.finished
    text = "\n".join(render(summary_))
    assert "job-1" in text and f"plot         {plot}" in text and "steps        3 of 3" in text


def test_report_of_a_folder_that_is_no_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl is missing"):
        summarize(tmp_path)


def test_piped_progress_prints_one_clean_line_every_n_steps() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=40)  # narrow: lines must not wrap
    bar = RunProgress(console, total_steps=7, start_step=0, epochs=1, log_every=3)
    with bar.live(0):
        for s in range(1, 8):
            bar.update(StepRecord(s, 1, 3.0, 2e-3, 100, 1.0, 1.0, 1.0, 1.0, 1))
    with bar.live(0):  # a retried stream that saw no step: nothing new to say
        pass
    lines = out.getvalue().splitlines()
    pattern = (
        r"step (\d+)/7 epoch 1/1 loss 3\.0000 lr 2\.00e-03 (-|[\d,]+) tok/s "
        r"elapsed \d+:\d\d:\d\d eta (-:--:--|\d+:\d\d:\d\d)"
    )
    steps = [int(re.fullmatch(pattern, line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert steps == [3, 6, 7]  # every 3rd step and the epoch's last


def test_log_every_below_one_is_refused() -> None:
    from lmps.client.train import TrainOptions

    with pytest.raises(ValueError, match="--log-every must be >= 1"):
        TrainOptions(log_every=0)
