"""One parameter server as the norm exchange of gradient clipping sees it, over gRPC.

`GrpcNormServer` is `lmps.core.clip.NormServer` on a channel: GradNorm and ApplyStep of one
job. The exchange itself (`lmps.core.clip.commit_step`) is plain code; the worker's
`ServerPool` and the coordinator's `Fleet` each give it one of these per server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import grpc

from lmps.v1 import parameter_pb2

GRAD_NORM = "/lmps.v1.ParameterService/GradNorm"
APPLY_STEP = "/lmps.v1.ParameterService/ApplyStep"


class Cancellable(Protocol):
    def cancel(self) -> bool: ...


class GrpcNormServer:
    """GradNorm / ApplyStep of `job_id` on one server, each call with `timeout_s` (GradNorm
    waits for the step's last push: give it as long as a pull). `track` / `untrack` see
    every call in flight, so that its owner can cancel them (a cancelled epoch)."""

    def __init__(
        self,
        channel: grpc.Channel,
        job_id: str,
        timeout_s: float,
        *,
        track: Callable[[Cancellable], None] | None = None,
        untrack: Callable[[Cancellable], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.timeout_s = timeout_s
        self._track, self._untrack = track, untrack
        self._grad_norm = channel.unary_unary(
            GRAD_NORM,
            request_serializer=parameter_pb2.GradNormRequest.SerializeToString,
            response_deserializer=parameter_pb2.GradNormResponse.FromString,
        )
        self._apply_step = channel.unary_unary(
            APPLY_STEP,
            request_serializer=parameter_pb2.ApplyStepRequest.SerializeToString,
            response_deserializer=parameter_pb2.ApplyStepResponse.FromString,
        )

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: object) -> object:
        # No wait_for_ready: a dead server must fail the step now, as a pull does.
        future = method.future(request, timeout=self.timeout_s)
        if self._track is not None:
            self._track(future)
        try:
            return future.result()
        finally:
            if self._untrack is not None:
                self._untrack(future)

    def grad_norm(self, step: int) -> tuple[int, Mapping[str, float]]:
        request = parameter_pb2.GradNormRequest(job_id=self.job_id, step=step)
        resp = self._call(self._grad_norm, request)
        assert isinstance(resp, parameter_pb2.GradNormResponse)
        return int(resp.version), {n.shard_id: n.sum_sq for n in resp.norms}

    def apply_step(self, step: int, grad_norm: float) -> float:
        request = parameter_pb2.ApplyStepRequest(job_id=self.job_id, step=step, grad_norm=grad_norm)
        resp = self._call(self._apply_step, request)
        assert isinstance(resp, parameter_pb2.ApplyStepResponse)
        return float(resp.grad_norm)
