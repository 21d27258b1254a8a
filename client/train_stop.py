"""How `lmps train` stops on Ctrl-C (or SIGTERM, which the CLI turns into one): the one
line it prints, saying how far the run got and the command that goes on from there."""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from rich.console import Console

from lmps.client.train_options import TrainOptions
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc

if TYPE_CHECKING:
    from lmps.client import run_log


@dataclass
class Where:
    """How far `lmps train` got: the one line a Ctrl-C (or SIGTERM) prints."""

    doing: str = "while preparing the corpus"
    resume: str = ""  # the command that continues the job, once there is one
    saved: str = ""  # the run folder, once the model is in it
    reported: bool = False  # an interrupted epoch printed its own line
    recorder: run_log.RunRecorder | None = None  # closed, so metrics.jsonl keeps every line

    def line(self) -> str:
        if self.saved:
            return f"interrupted {self.doing}; the model is saved in {self.saved}"
        if self.resume:
            return f"interrupted {self.doing}; resume with: {self.resume}"
        if self.doing.startswith("while submitting"):
            return (
                f"interrupted {self.doing}; no job to resume (one the coordinator was still "
                "creating would show in `lmps status`)"
            )
        return f"interrupted {self.doing}; no job was submitted"


def resume_command(opts: TrainOptions, job_id: str) -> str:
    """The `lmps train` line that continues `job_id` as this run would have: `--resume`
    alone would run the default number of epochs and write to runs/JOB."""
    cmd = f"lmps train --resume {job_id} --epochs {opts.epochs}"
    if opts.out:
        cmd += f" --out {shlex.quote(opts.out)}"
    if opts.coordinator != TrainOptions.coordinator:
        cmd += f" --coordinator {opts.coordinator}"
    return cmd


def say(console: Console, line: str) -> None:
    """One line straight to the console's file. A Ctrl-C that lands inside a rich print can
    leave that print's text in rich's buffer, and the next `console.print` would write it
    again before this line."""
    console.file.write(line + "\n")
    console.file.flush()


STOP_WAIT_S = 120.0  # how long an interrupted client waits for the coordinator to stop


def report_interrupt(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    job_id: str,
    total: int,
    console: Console,
    resume: str,
) -> None:
    """After Ctrl-C (the epoch's stream cancelled): wait until the coordinator has stopped
    the job at a step boundary, then say where and how to go on. A second Ctrl-C gives up
    waiting (the coordinator stops the job all the same)."""
    step: int | None = None
    deadline = time.monotonic() + STOP_WAIT_S
    try:
        while time.monotonic() < deadline:
            st = stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=10)
            if st.state != coordinator_pb2.RUNNING:
                step = int(st.step)
                break
            time.sleep(0.2)
    except (grpc.RpcError, KeyboardInterrupt):
        pass
    where = f"at step {step} of {total}" if step is not None else "(the job is still stopping)"
    say(console, f"interrupted {where}; resume with: {resume}")
