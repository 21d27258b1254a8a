"""gRPC face of a parameter server: unpack, call `ParameterStore`, pack."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import torch

from lmps.core.compress import Encoded
from lmps.core.errors import Aborted, InvalidArgument
from lmps.rpc import codec
from lmps.rpc.bootstrap import raw_messages
from lmps.rpc.codec import CodecError
from lmps.services.parameter_server.metrics import ServerMetrics
from lmps.services.parameter_server.store import ParameterStore, stats_of
from lmps.v1 import parameter_pb2, parameter_pb2_grpc, tensor_pb2


def _decode(msg: tensor_pb2.Tensor, what: str) -> torch.Tensor:
    try:
        return codec.decode(msg)
    except CodecError as err:
        raise InvalidArgument(f"{what}: {err}") from None


def _read_push(
    blob: bytes,
) -> parameter_pb2.PushHeader | tuple[str, int, torch.Tensor | Encoded]:
    try:
        return codec.read_push_request(blob)
    except CodecError as err:
        raise InvalidArgument(f"push: {err}") from None


def _complete(context: grpc.ServicerContext, what: str) -> None:
    """A client that cancels its stream can make the request iterator simply stop: that is
    a truncated request, never a complete one."""
    if not context.is_active():
        raise Aborted(f"{what}: the client cancelled the stream")


# The generated registration, with Pull answering the serialized ShardTensors it yields and
# Push reading its PushRequests as received bytes (tensor streams without message objects).
add_to_server = raw_messages(
    parameter_pb2_grpc.add_ParameterServiceServicer_to_server,
    responses=("Pull",),
    requests=("Push",),
)


class ParameterServicer(parameter_pb2_grpc.ParameterServiceServicer):
    def __init__(self, store: ParameterStore, metrics: ServerMetrics | None = None) -> None:
        self.store = store
        self.metrics = ServerMetrics() if metrics is None else metrics

    def Load(
        self, request_iterator: Iterator[parameter_pb2.LoadRequest], context: grpc.ServicerContext
    ) -> parameter_pb2.LoadResponse:
        header = next(request_iterator, None)
        if header is None or not header.HasField("header"):
            raise InvalidArgument("load: the first message must be a LoadHeader")
        h = header.header
        try:
            settings = codec.optimizer_from_proto(h.optimizer)
            consistency = codec.consistency_from_proto(h.consistency)
        except ValueError as err:
            raise InvalidArgument(f"load: {err}") from None
        shards = [codec.shard_from_proto(s) for s in h.shards]
        values = []
        states: dict[str, dict[str, torch.Tensor]] = {}
        for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "shard":
                if msg.shard.HasField("compression"):
                    raise InvalidArgument(f"load: shard {msg.shard.shard_id!r} is compressed")
                values.append((msg.shard.shard_id, _decode(msg.shard.tensor, msg.shard.shard_id)))
            elif kind == "state":
                sid = msg.state.shard_id
                values.append((sid, _decode(msg.state.value, sid)))
                opt = {k: _decode(v, f"{sid}/{k}") for k, v in msg.state.state.items()}
                if opt:
                    states[sid] = opt
            else:
                raise InvalidArgument("load: only one LoadHeader is allowed")
        _complete(context, "load")
        held = self.store.load(
            h.job_id,
            settings,
            shards,
            values,
            h.members,
            h.version,
            state=states,
            checkpoint_every=h.checkpoint_every,
            history=h.history,
            consistency=consistency,
            max_staleness=h.max_staleness,
            max_grad_norm=h.max_grad_norm,
            fragments=h.fragments,
        )
        self.metrics.version.set(h.version)
        self.metrics.held_bytes.set(held)
        return parameter_pb2.LoadResponse(shards=len(shards), bytes=held)

    def Pull(
        self, request: parameter_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        try:
            dtype = codec.wire_dtype(request.wire_dtype)
        except CodecError as err:
            raise InvalidArgument(f"pull: {err}") from None
        if not dtype.is_floating_point:
            raise InvalidArgument(f"pull: wire dtype must be a float type, got {dtype}")
        # Pre-serialized responses (`add_to_server` mounts Pull with a raw serializer): one
        # encoding per version and wire dtype, shared by every worker pulling that version.
        _, blobs = self.store.pull_encoded(
            request.job_id,
            request.min_version,
            list(request.shard_ids),
            context.time_remaining(),
            context.is_active,
            key=dtype,
            encode=lambda sid, version, t: codec.shard_tensor_bytes(sid, version, t, dtype),
        )
        for blob in blobs:
            self.metrics.pulled_bytes.inc(len(blob))
            yield blob

    def Push(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> parameter_pb2.PushResponse:
        # Raw requests (`add_to_server`): each gradient is a view of the bytes received, so
        # the pending contribution is those bytes, not a decoded copy of them.
        head = next(request_iterator, None)
        first = None if head is None else _read_push(head)
        if not isinstance(first, parameter_pb2.PushHeader):
            raise InvalidArgument("push: the first message must be a PushHeader")
        self.store.pushing(first.job_id, first.step)
        grads: list[tuple[str, torch.Tensor | Encoded]] = []
        nbytes = 0
        for blob in request_iterator:
            msg = _read_push(blob)
            if isinstance(msg, parameter_pb2.PushHeader):
                raise InvalidArgument("push: only one PushHeader is allowed")
            sid, _, grad = msg
            # Bytes as received: a compressed gradient is decoded by the store.
            if isinstance(grad, torch.Tensor):
                nbytes += grad.numel() * grad.element_size()
            else:
                nbytes += grad.nbytes
            grads.append((sid, grad))
            del blob, msg, grad
        _complete(context, "push")
        h = first
        computed_at = h.computed_at if h.HasField("computed_at") else None
        result = self.store.push(h.job_id, h.worker_id, h.step, h.weight, grads, computed_at)
        self.metrics.pushes.inc()
        self.metrics.staleness.observe(result.staleness)
        self.metrics.pushed_bytes.inc(nbytes)
        if result.applied:
            self.metrics.applies.inc()
            self.metrics.version.set(result.version)
        return parameter_pb2.PushResponse(
            version=result.version, applied=result.applied, pending=result.pending
        )

    def SetMembers(
        self, request: parameter_pb2.SetMembersRequest, context: grpc.ServicerContext
    ) -> parameter_pb2.SetMembersResponse:
        version, applied = self.store.set_members(
            request.job_id,
            request.members,
            request.discard_pending,
            request.discard,
            join_at=request.join_at,
        )
        if applied:
            self.metrics.applies.inc()
            self.metrics.version.set(version)
        return parameter_pb2.SetMembersResponse(version=version, applied=applied)

    def Snapshot(
        self, request: parameter_pb2.SnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[parameter_pb2.ShardState]:
        snap = self.store.snapshot(
            request.job_id, request.version, context.time_remaining(), context.is_active
        )
        for sid, value in snap.values.items():
            state = {k: codec.encode(v) for k, v in snap.state.get(sid, {}).items()}
            yield parameter_pb2.ShardState(
                shard_id=sid,
                version=snap.version,
                value=codec.encode(value),
                state=state,
                history=snap.history,
            )

    def ListShards(
        self, request: parameter_pb2.ListShardsRequest, context: grpc.ServicerContext
    ) -> parameter_pb2.ListShardsResponse:
        job_id, version, specs, members, pushed = self.store.describe(request.job_id)
        state_bytes = self.store.shard_state_bytes(job_id) if job_id else {}
        infos = []
        for spec in specs:
            info = parameter_pb2.ShardInfo(
                spec=codec.shard_to_proto(spec),
                dtype="float32",
                shape=[spec.numel],
                version=version,
                byte_size=spec.numel * 4,
                optimizer_state_bytes=state_bytes.get(spec.shard_id, 0),
            )
            if request.with_stats:
                _, _, value, _ = self.store.shard(job_id, spec.shard_id)
                info.stats.CopyFrom(_stats(value))
            infos.append(info)
        return parameter_pb2.ListShardsResponse(
            server_id=self.store.server_id,
            job_id=job_id,
            version=version,
            shards=infos,
            members=members,
            pushed=pushed,
            total_bytes=sum(s.numel * 4 for s in specs),
            history=self.store.history(job_id) if job_id else "",
            awaiting_norm=self.store.awaiting_norm(job_id) if job_id else False,
        )

    def GetShard(
        self, request: parameter_pb2.GetShardRequest, context: grpc.ServicerContext
    ) -> parameter_pb2.ShardInfo:
        if not request.shard_id:
            raise InvalidArgument("get shard: shard_id is required")
        spec, version, value, state_bytes = self.store.shard(request.job_id, request.shard_id)
        return parameter_pb2.ShardInfo(
            spec=codec.shard_to_proto(spec),
            dtype="float32",
            shape=[spec.numel],
            version=version,
            byte_size=spec.numel * 4,
            stats=_stats(value),
            optimizer_state_bytes=state_bytes,
        )

    def GradNorm(
        self, request: parameter_pb2.GradNormRequest, context: grpc.ServicerContext
    ) -> parameter_pb2.GradNormResponse:
        version, sums = self.store.grad_norm(
            request.job_id, request.step, context.time_remaining(), context.is_active
        )
        norms = [parameter_pb2.ShardNorm(shard_id=sid, sum_sq=x) for sid, x in sums.items()]
        return parameter_pb2.GradNormResponse(norms=norms, version=version)

    def ApplyStep(
        self, request: parameter_pb2.ApplyStepRequest, context: grpc.ServicerContext
    ) -> parameter_pb2.ApplyStepResponse:
        version, norm, applied = self.store.apply_step(
            request.job_id, request.step, request.grad_norm
        )
        if applied:
            self.metrics.applies.inc()
            self.metrics.version.set(version)
        return parameter_pb2.ApplyStepResponse(version=version, grad_norm=norm)


def _stats(value: torch.Tensor) -> parameter_pb2.ShardStats:
    s = stats_of(value)
    return parameter_pb2.ShardStats(
        norm=s.norm, mean=s.mean, std=s.std, max_abs=s.max_abs, nonfinite=s.nonfinite
    )
