"""The progress `lmps train` shows: a live bar on a terminal, plain lines when piped.

Both count global steps of the whole run (step / the job's resolved total_steps) and show
the epoch, the recent loss, the learning rate, the run's token rate and an ETA for the rest
of the run (from the rate of the steps this invocation has seen). When the console is not a
terminal (piped into a file or `tee`), one line is printed every `log_every` steps and at
the end of each epoch:

    step 20/128 epoch 1/3 loss 5.1234 lr 2.95e-03 12,345 tok/s elapsed 0:00:08 eta 0:00:43
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from lmps.client.run_log import StepRecord


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    return str(timedelta(seconds=max(0, round(seconds))))


class RunProgress:
    """Step progress of one `lmps train` run: `live()` around each epoch's stream,
    `update(record)` for each global step."""

    def __init__(
        self,
        console: Console,
        *,
        total_steps: int,
        start_step: int,
        epochs: int,
        log_every: int = 10,
    ) -> None:
        self.console = console
        self.total = max(1, total_steps)
        self.step = start_step
        self.epochs = epochs
        self.epoch = 0
        self.log_every = max(1, log_every)
        self.piped = not console.is_terminal
        self._started = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, step) before the first update
        self._tokens = 0
        self._recent: list[float] = []
        self._lr: float | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._printed = -1  # step of the last piped line

    # -- numbers

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def tokens_per_s(self) -> float | None:
        if self._first is None:
            return None
        dt = time.monotonic() - self._first[0]
        return self._tokens / dt if dt > 0 else None

    def eta(self) -> float | None:
        """Seconds left for the whole run, at the rate of the steps seen so far."""
        if self._first is None or self.step <= self._first[1]:
            return None
        dt = time.monotonic() - self._first[0]
        rate = (self.step - self._first[1]) / dt if dt > 0 else 0.0
        return max(0, self.total - self.step) / rate if rate > 0 else None

    def loss(self) -> float | None:
        return sum(self._recent) / len(self._recent) if self._recent else None

    # -- display

    def line(self) -> str:
        """The state as one plain line (what piped output prints)."""
        loss, tps = self.loss(), self.tokens_per_s()
        return (
            f"step {self.step}/{self.total} epoch {self.epoch}/{self.epochs} "
            f"loss {'-' if loss is None else f'{loss:.4f}'} "
            f"lr {'-' if self._lr is None else f'{self._lr:.2e}'} "
            f"{'-' if tps is None else f'{tps:,.0f}'} tok/s "
            f"elapsed {_clock(self.elapsed())} eta {_clock(self.eta())}"
        )

    @contextlib.contextmanager
    def live(self, epoch: int) -> Iterator[RunProgress]:
        """Around one epoch's stream (0-based `epoch`): the live bar on a terminal."""
        self.epoch = epoch + 1
        if self.piped:
            try:
                yield self
            finally:  # the epoch's last step, unless its line is out already
                if self._printed != self.step and self._first is not None:
                    self._print()
            return
        columns = (
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[elapsed]} eta {task.fields[eta]}"),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            self._progress = progress
            self._task = progress.add_task(
                "train", total=self.total, completed=self.step, **self._fields()
            )
            try:
                yield self
            finally:
                self._progress = self._task = None

    def update(self, record: StepRecord) -> None:
        if self._first is None:
            # The first step's own time is not seen: count the rate from its end.
            self._first = (time.monotonic(), record.step)
        else:
            self._tokens += record.tokens
        self.step = record.step
        self.epoch = record.epoch or self.epoch
        self._lr = record.lr
        self._recent = [*self._recent[-19:], record.loss]
        if self.piped:
            if record.step % self.log_every == 0:
                self._print()
        elif self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.step, **self._fields())

    def _print(self) -> None:
        self.console.print(self.line(), markup=False, highlight=False, soft_wrap=True)
        self._printed = self.step

    def _fields(self) -> dict[str, Any]:
        loss, tps = self.loss(), self.tokens_per_s()
        return {
            "epoch": f"{self.epoch}/{self.epochs}",
            "loss": "-" if loss is None else f"{loss:.3f}",
            "lr": "-" if self._lr is None else f"{self._lr:.2e}",
            "tps": "-" if tps is None else f"{tps:,.0f}",
            "elapsed": _clock(self.elapsed()),
            "eta": _clock(self.eta()),
        }
