"""`lmps report RUN_DIR`: the summary of a run folder that `lmps train` left.

Read from RUN_DIR/metrics.jsonl (written as the run goes, so an interrupted run has one
too) and RUN_DIR/report.json when the run finished. Imports no torch: it answers at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmps.client.run_log import METRICS, PLOT, REPORT, read_metrics


@dataclass(frozen=True)
class RunSummary:
    run: Path
    job_id: str
    epochs_done: int
    epochs: int
    steps: int
    total_steps: int
    train_loss: float | None
    eval_loss: float | None
    perplexity: float | None
    initial_eval_loss: float | None
    tokens_per_s: float | None
    tokens: int
    wall_s: float | None
    finished: bool
    plot: Path | None
    task: str = "lm"
    accuracy: float | None = None
    """classify: eval accuracy after the last epoch."""
    macro_f1: float | None = None
    baseline: float | None = None
    """classify: the eval split's majority-class accuracy (report.json)."""


def summarize(run: Path) -> RunSummary:
    """The summary of RUN; FileNotFoundError (one line, naming the file) if it is no run
    folder."""
    metrics = run / METRICS
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics} is missing: pass a run folder written by `lmps train` (runs/JOB or --out)"
        )
    rows = read_metrics(metrics)
    jobs = [r for r in rows if r.get("kind") == "job"]
    steps = [r for r in rows if r.get("kind") == "step"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    ends = [r for r in evals if int(r.get("epoch", 0)) > 0]
    report: dict[str, Any] = {}
    if (run / REPORT).is_file():
        try:
            report = json.loads((run / REPORT).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            report = {}
    last = ends[-1] if ends else {}
    initial = [r for r in evals if int(r.get("epoch", 0)) == 0]
    rates = [float(r["tokens_per_s"]) for r in ends if r.get("tokens_per_s") is not None]
    job = jobs[-1] if jobs else {}
    wall = report.get("wall_s")
    return RunSummary(
        run=run,
        job_id=str(job.get("job_id") or report.get("job_id") or "?"),
        epochs_done=int(last.get("epoch", 0)),
        epochs=int(job.get("epochs", 0)),
        steps=max([int(r["step"]) for r in steps + ends] or [int(job.get("start_step", 0))]),
        total_steps=int(job.get("total_steps", 0)),
        train_loss=last.get("train_loss"),
        eval_loss=last.get("eval_loss"),
        perplexity=last.get("perplexity"),
        initial_eval_loss=initial[0].get("eval_loss") if initial else None,
        tokens_per_s=sum(rates) / len(rates) if rates else None,
        tokens=sum(int(r.get("tokens", 0)) for r in steps),
        wall_s=float(wall) if isinstance(wall, int | float) else None,
        finished=bool(report),
        plot=run / PLOT if (run / PLOT).is_file() else None,
        task=str(report.get("task", "lm")),
        accuracy=last.get("accuracy"),
        macro_f1=last.get("macro_f1"),
        baseline=_float(report.get("majority_baseline")),
    )


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _f(value: float | None, fmt: str = ".4f") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, fmt)


def _eval_unit(s: RunSummary) -> str:
    if s.task == "classify":
        return "(per example)"
    if s.task == "sft":
        return f"(per response token, perplexity {_f(s.perplexity, '.1f')})"
    return f"(perplexity {_f(s.perplexity, '.1f')})"


def render(s: RunSummary) -> list[str]:
    """The summary as plain lines (`lmps report` prints them)."""
    state = "finished" if s.finished else "unfinished: no report.json yet"
    lines = [
        f"run          {s.run} (job {s.job_id}, {state})",
        f"epochs       {s.epochs_done} of {s.epochs}",
        f"steps        {s.steps} of {s.total_steps}",
        f"train loss   {_f(s.train_loss)} (mean of the last epoch)",
        f"eval loss    {_f(s.eval_loss)} {_eval_unit(s)}; initial {_f(s.initial_eval_loss)}",
        f"tokens/s     {_f(s.tokens_per_s, ',.0f')} (mean over epochs); {s.tokens:,} tokens",
    ]
    if s.accuracy is not None:
        pct = None if s.baseline is None else 100 * s.baseline
        lines.insert(
            5,
            f"accuracy     {_f(100 * s.accuracy, '.1f')}% (majority-class baseline "
            f"{_f(pct, '.1f')}%); macro-F1 {_f(s.macro_f1, '.3f')}",
        )
    if s.wall_s is not None:
        lines.append(f"wall time    {s.wall_s:.1f} s")
    lines.append(f"plot         {s.plot if s.plot else '- (no loss.png yet)'}")
    return lines
