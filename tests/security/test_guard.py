"""One in-process parameter server behind mutual TLS, a token and small limits.

Real gRPC over 127.0.0.1 (the bootstrap every service uses); the multi-process cluster with
training is tests/security/test_secure_cluster.py.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lmps.client.certs import DevPki, issue, pem_cert, pem_key
from lmps.rpc import codec, security
from lmps.rpc.bootstrap import RunningServer, ServeOptions, Service, start_server
from lmps.rpc.channel import open_channel
from lmps.services.parameter_server.servicer import ParameterServicer, add_to_server
from lmps.services.parameter_server.store import ParameterStore
from lmps.v1 import parameter_pb2, parameter_pb2_grpc, tensor_pb2
from tests.security.helpers import client_security, server_security

LIMITS = {
    "max_message_bytes": 4 * 1024 * 1024,
    "max_stream_messages": 5,
    "max_streams_per_peer": 3,
}


def _serve(sec: security.Security, health_port: int = -1) -> RunningServer:
    service = Service(
        "lmps.v1.ParameterService",
        add_to_server,
        ParameterServicer(ParameterStore("ps-test")),
    )
    opts = ServeOptions(host="127.0.0.1", health_port=health_port, grace_s=0, security=sec)
    return start_server(opts, [service])


@pytest.fixture(scope="module")
def server(pki: DevPki) -> Iterator[RunningServer]:
    running = _serve(server_security(pki, **LIMITS), health_port=0)
    try:
        yield running
    finally:
        running.stop(0)


def _address(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _list_shards(address: str, config: security.Security) -> grpc.StatusCode:
    with open_channel(address, config=config) as ch:
        stub = parameter_pb2_grpc.ParameterServiceStub(ch)
        return _code(lambda: stub.ListShards(parameter_pb2.ListShardsRequest(), timeout=5))


def _push_messages(grads: int, numel: int = 1) -> Iterator[parameter_pb2.PushRequest]:
    header = parameter_pb2.PushHeader(job_id="job", worker_id="w", step=0, weight=1.0)
    yield parameter_pb2.PushRequest(header=header)
    tensor = codec.encode(torch.zeros(numel))
    for i in range(grads):
        yield parameter_pb2.PushRequest(
            grad=tensor_pb2.ShardTensor(shard_id=f"p#{i}", tensor=tensor)
        )


def _serving(address: str, config: security.Security) -> int:
    with open_channel(address, config=config) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _codes_without_token(address: str, config: security.Security) -> list[grpc.StatusCode]:
    """ListShards, a Push stream and reflection, as `config`."""
    with open_channel(address, config=config) as ch:
        ps = parameter_pb2_grpc.ParameterServiceStub(ch)
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        return [
            _code(lambda: ps.ListShards(parameter_pb2.ListShardsRequest(), timeout=5)),
            _code(lambda: ps.Push(_push_messages(2), timeout=5)),
            _code(lambda: list(refl.ServerReflectionInfo(iter([request]), timeout=5))),
        ]


def test_token_required_on_every_rpc_but_health(server: RunningServer, pki: DevPki) -> None:
    address = _address(server)
    for config in (client_security(pki, token=""), client_security(pki, token="wrong")):
        assert _codes_without_token(address, config) == [grpc.StatusCode.UNAUTHENTICATED] * 3
        assert _serving(address, config) == health_pb2.HealthCheckResponse.SERVING
    assert _list_shards(address, client_security(pki)) == grpc.StatusCode.OK


def test_strangers_fail_the_handshake(
    server: RunningServer, pki: DevPki, stranger_pki: DevPki
) -> None:
    address = _address(server)
    good = client_security(pki)
    strangers = {
        "plaintext": security.Security(token=good.token),
        "no client certificate": client_security(pki, cert=False),
        "certificate from another CA": client_security(stranger_pki, token=good.token, ca=pki.ca),
        "trusts another CA": client_security(pki, ca=stranger_pki.ca),
    }
    for name, config in strangers.items():
        assert _list_shards(address, config) == grpc.StatusCode.UNAVAILABLE, name
    assert _list_shards(address, good) == grpc.StatusCode.OK


def test_server_name_override_verifies_a_cert_without_the_dialled_ip(
    pki: DevPki, tmp_path: Path
) -> None:
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    key, cert = issue(ca_key, ca_cert, "ps", hosts=["ps.internal"], server=True)
    (tmp_path / "ps.pem").write_bytes(pem_cert(cert))
    (tmp_path / "ps-key.pem").write_bytes(pem_key(key))
    tls = security.Tls(cert=str(tmp_path / "ps.pem"), key=str(tmp_path / "ps-key.pem"))
    running = _serve(security.Security(tls=tls))
    try:
        plain = security.Security(tls=security.Tls(ca=str(pki.ca)))
        assert _list_shards(_address(running), plain) == grpc.StatusCode.UNAVAILABLE
        named = security.Security(tls=security.Tls(ca=str(pki.ca), server_name="ps.internal"))
        assert _list_shards(_address(running), named) == grpc.StatusCode.OK
    finally:
        running.stop(0)


def test_health_only_port_is_plaintext_and_serves_nothing_else(server: RunningServer) -> None:
    address = f"127.0.0.1:{server.health_port}"
    plaintext = security.Security()
    assert _serving(address, plaintext) == health_pb2.HealthCheckResponse.SERVING
    assert _list_shards(address, plaintext) == grpc.StatusCode.UNIMPLEMENTED


def test_over_long_stream_and_over_size_message_are_refused(
    server: RunningServer, pki: DevPki
) -> None:
    with open_channel(_address(server), config=client_security(pki)) as ch:
        ps = parameter_pb2_grpc.ParameterServiceStub(ch)
        # Within the limit the servicer judges the push itself (no job is loaded: refused).
        short = _code(lambda: ps.Push(_push_messages(4), timeout=5))
        assert short not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
        long = _code(lambda: ps.Push(_push_messages(50), timeout=5))
        assert long == grpc.StatusCode.RESOURCE_EXHAUSTED
        huge = _code(lambda: ps.Push(_push_messages(1, numel=5 * 1024 * 1024 // 4), timeout=5))
        assert huge == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        _serving(_address(server), client_security(pki)) == health_pb2.HealthCheckResponse.SERVING
    )


class HeldStream:
    """A reflection stream kept open: it occupies one call slot on the server."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        self.call = stub.ServerReflectionInfo(iter(self._requests.get, None), timeout=30)
        self._requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))

    def opened(self) -> grpc.StatusCode:
        """OK once the server answered; the refusal's code otherwise."""
        return _code(lambda: next(self.call))

    def end(self) -> None:
        self._requests.put(None)


def test_too_many_concurrent_calls_from_one_host(server: RunningServer, pki: DevPki) -> None:
    address, limit = _address(server), LIMITS["max_streams_per_peer"]
    with open_channel(address, config=client_security(pki)) as ch:
        held = [HeldStream(ch) for _ in range(limit)]
        assert [h.opened() for h in held] == [grpc.StatusCode.OK] * limit
        extra = HeldStream(ch)
        assert extra.opened() == grpc.StatusCode.RESOURCE_EXHAUSTED
        extra.end()
        assert _list_shards(address, client_security(pki)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _serving(address, client_security(pki)) == health_pb2.HealthCheckResponse.SERVING
        held[0].end()  # a stream that finishes, and ones the client cancels, free their slot
        for h in held[1:]:
            h.call.cancel()
        assert server.guard is not None
        deadline = time.monotonic() + 10
        while server.guard.slots.in_flight("127.0.0.1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.guard.slots.in_flight("127.0.0.1") == 0
    assert _list_shards(address, client_security(pki)) == grpc.StatusCode.OK
