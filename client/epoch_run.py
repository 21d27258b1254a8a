"""One epoch of `lmps train`: stream the coordinator's `RunEpoch` events into the run folder
and the progress display, and carry on across a coordinator restart."""

from __future__ import annotations

import math
import time

import grpc
from rich.console import Console

from lmps.client import run_log
from lmps.client.progress import RunProgress
from lmps.client.train_options import TrainOptions
from lmps.core.model import perplexity
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2


def job_status(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub, job_id: str
) -> coordinator_pb2.JobStatus:
    """The job's status; waits (up to a minute) for a coordinator that is not up yet."""
    return stub.GetJob(
        coordinator_pb2.GetJobRequest(job_id=job_id), timeout=60, wait_for_ready=True
    )


def run_epoch_retrying(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    job_id: str,
    epoch: int,
    opts: TrainOptions,
    console: Console,
    recorder: run_log.RunRecorder,
    bar: RunProgress,
) -> job_pb2.EpochSummary:
    """Run an epoch; if the coordinator goes away (restart), wait for it and carry on."""
    deadline = time.monotonic() + opts.retry_s
    while True:
        try:
            return run_epoch(stub, job_id, epoch, console, recorder, bar)
        except grpc.RpcError as err:
            if (
                err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
                or time.monotonic() > deadline
            ):
                raise
            console.print(
                f"[yellow]coordinator unavailable ({err.details()}); retrying epoch {epoch + 1}[/]"
            )
        time.sleep(2.0)
        try:
            st = job_status(stub, job_id)
        except grpc.RpcError:
            continue
        if st.epochs_done > epoch:  # it finished while we were away: report what we know
            return job_pb2.EpochSummary(
                epoch=epoch,
                end_step=st.step,
                eval_loss=st.last_eval_loss,
                eval_perplexity=perplexity(st.last_eval_loss),
                train_loss=math.nan,
            )


def run_epoch(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    job_id: str,
    epoch: int,
    console: Console,
    recorder: run_log.RunRecorder,
    bar: RunProgress,
) -> job_pb2.EpochSummary:
    stream = stub.RunEpoch(
        coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=epoch), wait_for_ready=True
    )
    summary: job_pb2.EpochSummary | None = None
    try:
        with bar.live(epoch):
            # grpc waits for the next event in short naps, so Ctrl-C (and SIGTERM, turned
            # into KeyboardInterrupt by the CLI) gets through between them.
            for ev in stream:
                kind = ev.WhichOneof("kind")
                if kind == "start":
                    recorder.epoch_started(epoch, len(ev.start.workers))
                elif kind == "step":
                    recorder.step(ev.step)  # a whole global step goes to metrics.jsonl, the bar
                elif kind == "summary":
                    summary = ev.summary
                    recorder.steps_done()
    except KeyboardInterrupt:
        # The coordinator sees the stream go and stops the job at a step boundary.
        stream.cancel()
        raise
    if summary is None:
        raise RuntimeError(f"epoch {epoch + 1} ended without a summary")
    if math.isnan(summary.eval_loss):
        console.print("[yellow]no eval data: eval loss is NaN[/]")
    return summary
