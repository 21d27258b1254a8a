"""The run directory `lmps train` leaves: `runs/<job>` unless --out names another.

It holds the model (`model.safetensors`, `config.json`, `tokenizer.json`, see `model_io`),
`report.json`, `metrics.jsonl` and `loss.png`. `metrics.jsonl` is one JSON object a line,
each with a `kind`:

- `job`: once per `lmps train` (again on --resume): job id, planned epochs, total_steps,
  the step it starts at.
- `step`: one per global step (= one parameter update): `step` is the update's number,
  1-based (the parameter version after it, the same count as an eval's `step`); `loss` is
  the mean over the workers' batches; `tokens` their sum; `tokens_per_s` the sum of the
  workers' own throughputs over the step; `pull_ms` / `compute_ms` / `push_ms` the workers'
  mean; `lr` the rate the servers applied (`lmps.core.optim.lr_at` of the job's resolved
  optimizer); `grad_norm` the global L2 norm of the step's gradient before clipping
  (`--max-grad-norm`; the workers' mean, which under SYNC is one value; null with clipping
  off). With `--fragments` a lease's flushes train no batch and have no row: their version
  numbers are skipped.
- `eval`: one per evaluation: the initial one (epoch 0, step 0) and one at every epoch end
  (`epoch` 1-based, with the epoch's mean `train_loss` and `tokens_per_s`). `eval_loss` is
  the task's: per token (lm), per example (classify), per response token (sft); a classify
  job's rows also have `accuracy` and `macro_f1` (report.json: the confusion matrix).

A value that is not a finite number (no eval data: NaN) is written as null. Every file is
written with the same mode, 0666 less the umask (`file_mode`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lmps.v1 import job_pb2

RUNS_ROOT = Path("runs")
"""Where run directories go when --out is not given: `runs/<job>`, relative to the cwd."""
METRICS = "metrics.jsonl"
PLOT = "loss.png"
REPORT = "report.json"


def run_dir(out: str, job_id: str) -> Path:
    """The run directory of a job: --out when given, else `runs/<job>`."""
    return Path(out) if out else RUNS_ROOT / job_id


def file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0666 less the process umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux >= 4.7 says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (not thread-safe; the CLI is one thread)
    os.umask(mask)
    return mask


def fix_mode(path: Path) -> None:
    """Give `path` the mode a plain new file gets (files written through a temp file, such
    as safetensors' save, come out 0600 otherwise)."""
    os.chmod(path, file_mode())


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class StepRecord:
    """One global step, over the workers' StepEvents of it."""

    step: int
    """Parameter version after this update (1-based)."""
    epoch: int
    """1-based."""
    loss: float
    lr: float | None
    tokens: int
    tokens_per_s: float
    pull_ms: float
    compute_ms: float
    push_ms: float
    workers: int
    """Workers whose batch went into this step."""
    grad_norm: float | None = None
    """The step's gradient norm before clipping (the workers' mean: under SYNC they report
    one value; local steps: each its inner step's); None with clipping off."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "step",
            "step": self.step,
            "epoch": self.epoch,
            "loss": _num(self.loss),
            "lr": self.lr,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "pull_ms": round(self.pull_ms, 3),
            "compute_ms": round(self.compute_ms, 3),
            "push_ms": round(self.push_ms, 3),
            "grad_norm": self.grad_norm,
            "workers": self.workers,
            "time": round(time.time(), 3),
        }


class StepAggregator:
    """Folds the per-worker StepEvents of an epoch into one `StepRecord` per global step.

    A step is complete once every worker of the epoch reported it, or once an event two steps
    later arrives (a worker was lost: in sync training step s + 2 cannot start before s was
    applied); `flush` completes the rest at the epoch's end. An event for a step already
    completed (very late) is dropped from the metrics."""

    def __init__(self, epoch: int, workers: int, lr: Callable[[int], float | None]) -> None:
        self.epoch = epoch
        self.workers = max(1, workers)
        self._lr = lr
        self._pending: dict[int, list[job_pb2.StepEvent]] = {}
        self._done_below = 0  # steps (0-based) below this were emitted

    def add(self, event: job_pb2.StepEvent) -> list[StepRecord]:
        s = int(event.step)
        if s < self._done_below:
            return []
        self._pending.setdefault(s, []).append(event)
        ready = [k for k, evs in self._pending.items() if len(evs) >= self.workers or k <= s - 2]
        return [self._emit(k) for k in sorted(ready)]

    def flush(self) -> list[StepRecord]:
        return [self._emit(k) for k in sorted(self._pending)]

    def _emit(self, step: int) -> StepRecord:
        evs = self._pending.pop(step)
        n = len(evs)
        self._done_below = max(self._done_below, step + 1)
        return StepRecord(
            step=step + 1,
            epoch=self.epoch,
            loss=sum(e.loss for e in evs) / n,
            lr=self._lr(step),
            tokens=sum(int(e.tokens) for e in evs),
            tokens_per_s=sum(e.tokens_per_s for e in evs),
            pull_ms=1e3 * sum(e.pull_s for e in evs) / n,
            compute_ms=1e3 * sum(e.compute_s for e in evs) / n,
            push_ms=1e3 * sum(e.push_s for e in evs) / n,
            workers=n,
            grad_norm=sum(e.grad_norm for e in evs) / n if any(e.grad_norm for e in evs) else None,
        )


class MetricsLog:
    """Appends to RUN/metrics.jsonl, one flushed line per record (a crash loses no line)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        new = not path.exists()
        self._file: IO[str] = path.open("a", encoding="utf-8")
        if new:
            fix_mode(path)

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def job(self, job_id: str, *, epochs: int, total_steps: int, start_step: int) -> None:
        self.write(
            {
                "kind": "job",
                "job_id": job_id,
                "epochs": epochs,
                "total_steps": total_steps,
                "start_step": start_step,
                "time": round(time.time(), 3),
            }
        )

    def step(self, record: StepRecord) -> None:
        self.write(record.to_json())

    def eval(
        self,
        *,
        epoch: int,
        step: int,
        eval_loss: float,
        perplexity: float,
        train_loss: float | None = None,
        tokens_per_s: float | None = None,
        accuracy: float | None = None,
        macro_f1: float | None = None,
    ) -> None:
        row: dict[str, Any] = {
            "kind": "eval",
            "epoch": epoch,
            "step": step,
            "eval_loss": _num(eval_loss),
            "perplexity": _num(perplexity),
        }
        if train_loss is not None:
            row["train_loss"] = _num(train_loss)
        if tokens_per_s is not None:
            row["tokens_per_s"] = _num(round(tokens_per_s, 1))
        if accuracy is not None:
            row["accuracy"] = _num(accuracy)
        if macro_f1 is not None:
            row["macro_f1"] = _num(macro_f1)
        row["time"] = round(time.time(), 3)
        self.write(row)

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short (the writer was killed) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    fix_mode(path)


def plot(run: Path, rows: Iterable[dict[str, Any]] | None = None) -> Path | None:
    """Draw train and eval loss against the step into RUN/loss.png (replaced atomically);
    None, with nothing written, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = list(read_metrics(run / METRICS) if rows is None else rows)
    steps = [r for r in rows if r.get("kind") == "step" and r.get("loss") is not None]
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("eval_loss") is not None]
    jobs = [r for r in rows if r.get("kind") == "job"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if steps:
            ax.plot(
                [r["step"] for r in steps],
                [r["loss"] for r in steps],
                lw=0.8,
                alpha=0.8,
                label="train loss (per step)",
            )
        if evals:
            ax.plot(
                [r["step"] for r in evals],
                [r["eval_loss"] for r in evals],
                "o-",
                lw=1.5,
                label="eval loss",
            )
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(f"lmps {jobs[-1]['job_id']}" if jobs else "lmps")
        ax.grid(True, alpha=0.3)
        if steps or evals:
            ax.legend()
        fig.tight_layout()
        tmp = run / f".{PLOT}.tmp"
        with tmp.open("wb") as f:
            fig.savefig(f, format="png")
        fix_mode(tmp)
        os.replace(tmp, run / PLOT)
    finally:
        plt.close(fig)
    return run / PLOT


class RunRecorder:
    """What `lmps train` writes into the run directory while it trains, and the step
    records it hands to a progress display (`on_step`)."""

    def __init__(
        self,
        run: Path,
        *,
        lr: Callable[[int], float | None],
        on_step: Callable[[StepRecord], None] = lambda _r: None,
    ) -> None:
        self.run = run
        self.metrics = MetricsLog(run / METRICS)
        self._lr = lr
        self._on_step = on_step
        self._steps: StepAggregator | None = None
        self.plot_missing = False
        """True once a plot was skipped because matplotlib is not installed."""

    def epoch_started(self, epoch: int, workers: int) -> None:
        """A new epoch (0-based) began (or an epoch's stream was retried)."""
        self._emit(self._steps.flush() if self._steps else [])
        self._steps = StepAggregator(epoch + 1, workers, self._lr)

    def step(self, event: job_pb2.StepEvent) -> None:
        if self._steps is None:  # a stream without a start event
            self._steps = StepAggregator(0, 1, self._lr)
        self._emit(self._steps.add(event))

    def steps_done(self) -> None:
        """The epoch's stream has no more steps: complete the ones still open."""
        self._emit(self._steps.flush() if self._steps else [])
        self._steps = None

    def epoch_ended(self, summary: job_pb2.EpochSummary) -> Path | None:
        """Log the epoch's eval and redraw the plot (None if it could not be drawn)."""
        self.steps_done()
        classify = len(summary.eval_confusion) > 0  # only a classify job counts one
        self.metrics.eval(
            epoch=int(summary.epoch) + 1,
            step=int(summary.end_step),
            eval_loss=summary.eval_loss,
            perplexity=summary.eval_perplexity,
            train_loss=summary.train_loss,
            tokens_per_s=summary.tokens_per_s,
            accuracy=summary.eval_accuracy if classify else None,
            macro_f1=summary.eval_macro_f1 if classify else None,
        )
        drawn = plot(self.run)
        self.plot_missing = drawn is None
        return drawn

    def _emit(self, records: list[StepRecord]) -> None:
        for r in records:
            self.metrics.step(r)
            self._on_step(r)

    def close(self) -> None:
        self.metrics.close()
