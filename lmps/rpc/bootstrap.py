"""One server bootstrap for every lmps service.

Gives each service the same surroundings: gRPC health checking (grpc.health.v1) and server
reflection (so `grpcurl -plaintext HOST:PORT list` works), a Prometheus `/metrics`
endpoint, RPC metrics and error mapping by interceptor, raised message limits, and a
graceful SIGTERM: health flips to NOT_SERVING, in-flight RPCs get `grace_s`, exit 0.
These follow grpc/grpc's examples/python (health_checking, reflection, `server.stop(grace)`)
and the gRPC Health Checking Protocol (doc/health-checking.md).

Security (`lmps.rpc.security`, docs/security.md): TLS or mutual TLS on the port when a
certificate is configured, the bearer token and per-client limits by interceptor
(`lmps.rpc.guard`), and optionally a plaintext health-only port for probes that cannot do TLS.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from lmps.core.errors import LmpsError
from lmps.rpc.channel import KEEPALIVE_OPTIONS, message_options
from lmps.rpc.guard import Guard
from lmps.rpc.metrics import RpcMetrics, process_registry
from lmps.rpc.security import Security
from lmps.rpc.security import load as load_security

log = logging.getLogger("lmps.server")


class PortInUse(OSError):
    """A port this server was told to listen on is taken; names the flag that moves it."""

    def __init__(self, host: str, port: int, flag: str) -> None:
        super().__init__(
            f"port {port} is already in use (on {host}): stop what holds it, or choose "
            f"another with {flag} (0 = any free port)"
        )
        self.port, self.flag = port, flag


def port_taken(host: str, port: int) -> bool:
    """True when something already listens on host:port, so binding it would fail."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror:
        return False  # let the real bind report it
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is fine
        try:
            s.bind(address)
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def _bind(add: Callable[[], int], host: str, port: int, flag: str) -> int:
    """Call a server's add_*_port; a taken port is `PortInUse`. Checked first, so gRPC's
    own log line about it does not appear; a port taken in between is caught after."""
    if port and port_taken(host, port):
        raise PortInUse(host, port, flag)
    try:
        bound = add()
    except RuntimeError:  # grpc >= 1.5x: "Failed to bind to address ..."
        bound = 0
    if bound == 0:
        raise PortInUse(host, port, flag)
    return bound


@dataclass(frozen=True)
class ServeOptions:
    """How a service listens. Every field also comes from a flag and an LMPS_* variable."""

    host: str = "0.0.0.0"
    """Interface to bind."""
    port: int = 0
    """gRPC port; 0 picks a free one (tests)."""
    metrics_port: int = -1
    """Prometheus port; -1 disables the endpoint, 0 picks a free one."""
    grace_s: float = 5.0
    """Seconds in-flight RPCs get after SIGTERM before they are cancelled."""
    max_workers: int = 64
    """Handler threads. Streams hold one each for their whole life, so keep it generous."""
    health_port: int = -1
    """Extra plaintext port serving only grpc.health.v1 (for probes that cannot do TLS);
    -1 = none, 0 = any free port."""
    security: Security | None = None
    """TLS, token and limits; None = this process's settings (`lmps.rpc.security.load()`)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError(
                f"metrics port must be -1 (off) or in [0, 65535], got {self.metrics_port}"
            )
        if self.grace_s < 0:
            raise ValueError("grace must be >= 0 seconds")
        if self.max_workers < 4:
            raise ValueError("max_workers must be >= 4")
        if not -1 <= self.health_port < 65536:
            raise ValueError(
                f"health port must be -1 (off) or in [0, 65535], got {self.health_port}"
            )


def advertised_address(host: str, port: int, advertise: str = "") -> str:
    """The address other members should dial: `advertise` if given, else this host's IP."""
    if advertise:
        return advertise
    if host not in ("0.0.0.0", "::", "[::]", ""):
        return f"{host}:{port}"
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = "127.0.0.1"
    return f"{ip}:{port}"


@dataclass
class Service:
    """A servicer plus what the bootstrap needs to mount it."""

    name: str  # full proto name, e.g. "lmps.v1.ParameterService"
    add: Callable[[Any, grpc.Server], None]  # the generated add_XServicer_to_server
    servicer: Any


def _passthrough(blob: bytes) -> bytes:
    return blob


class _RawMessages:
    """A stand-in for `grpc.Server` that the generated add_XServicer_to_server registers
    into: the named methods' handlers get identity serializers, the rest pass through."""

    def __init__(
        self, server: grpc.Server, responses: frozenset[str], requests: frozenset[str]
    ) -> None:
        self._server, self._responses, self._requests = server, responses, requests
        self.mounted = False

    def add_generic_rpc_handlers(self, generic: Sequence[Any]) -> None:
        # The generated code passes a generic handler built from the same table it then
        # hands to `add_registered_method_handlers`: both are mounted from that table there.
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        table = {}
        for name, h in handlers.items():
            if name in self._responses:
                h = h._replace(response_serializer=_passthrough)
            if name in self._requests:
                h = h._replace(request_deserializer=_passthrough)
            table[name] = h
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, table),)
        )
        # Missing from grpc's type stubs; present on every grpcio this project pins.
        self._server.add_registered_method_handlers(service, table)  # type: ignore[attr-defined]
        self.mounted = True


def raw_messages(
    add: Callable[[Any, grpc.Server], None],
    *,
    responses: Sequence[str] = (),
    requests: Sequence[str] = (),
) -> Callable[[Any, grpc.Server], None]:
    """The generated `add` with the methods in `responses` answering pre-serialized bytes
    (the servicer yields `bytes` that already are the response message on the wire, e.g.
    `codec.shard_tensor_bytes`) and those in `requests` handed their request messages as
    received bytes (the servicer parses them, e.g. `codec.read_push_request`). Clients see
    the same messages; the server skips building a message object per message, which for
    tensor streams is copies of every byte. Interceptors still run."""
    out, into = frozenset(responses), frozenset(requests)

    def mount(servicer: Any, server: grpc.Server) -> None:
        proxy = _RawMessages(server, out, into)
        add(servicer, cast(grpc.Server, proxy))
        if not proxy.mounted:  # generated code of a grpcio-tools without registered methods
            raise RuntimeError(f"{add.__name__} registered no method handlers")

    return mount


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    metrics_port: int
    health: health.HealthServicer
    options: ServeOptions
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)
    health_port: int = -1
    """The plaintext health-only port, -1 when there is none."""
    health_server: grpc.Server | None = None
    guard: Guard | None = None
    registry: CollectorRegistry | None = None
    """What /metrics serves: this server's RPC series plus the role's own."""

    def stop(self, grace_s: float | None = None) -> None:
        """Flip health to NOT_SERVING, give in-flight RPCs `grace_s`, run on_stop hooks."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        for hook in self.on_stop:
            try:
                hook()
            except Exception:  # a failing hook must not block shutdown
                log.exception("shutdown hook failed")
        grace = self.options.grace_s if grace_s is None else grace_s
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _code_of(context: grpc.ServicerContext) -> str:
    code = context.code()  # type: ignore[attr-defined]  # real API; the stubs predate it
    return "OK" if code is None else code.name


MAX_DETAILS = 1000  # error details travel in trailers: a 20 KB echoed id would overflow them


def _short(text: str) -> str:
    return text if len(text) <= MAX_DETAILS else text[: MAX_DETAILS - 20] + "... (truncated)"


def _abort(context: grpc.ServicerContext, err: Exception) -> None:
    if isinstance(err, LmpsError):
        context.abort(getattr(grpc.StatusCode, err.code), _short(str(err)))
    assert isinstance(err, grpc.RpcError)
    if not callable(getattr(err, "code", None)):
        # Raised by the request iterator when the client cancelled its stream: the call is
        # over, there is nobody to tell; end it without an error log.
        context.abort(grpc.StatusCode.CANCELLED, "the client cancelled the stream")
    # A call this handler made to another member failed: pass its status on, not UNKNOWN.
    code, details = err.code(), err.details()
    context.abort(code, _short(f"downstream call failed: {details}"))


class _Interceptor(grpc.ServerInterceptor):
    """Maps LmpsError to status codes and records RPC metrics for every handler kind."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        seconds, total = self.metrics.seconds, self.metrics.total

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return behavior(request, context)
                except (LmpsError, grpc.RpcError) as err:
                    _abort(context, err)
                finally:
                    seconds.labels(method).observe(time.perf_counter() - start)
                    total.labels(method, _code_of(context)).inc()

            return run

        def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                try:
                    yield from behavior(request, context)
                except (LmpsError, grpc.RpcError) as err:
                    _abort(context, err)
                finally:
                    seconds.labels(method).observe(time.perf_counter() - start)
                    total.labels(method, _code_of(context)).inc()

            return run

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                unary(handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                unary(handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming(handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            streaming(handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )


def _health_only_server(
    options: ServeOptions, health_servicer: health.HealthServicer
) -> tuple[grpc.Server, int]:
    """A plaintext server with grpc.health.v1 only, sharing the main server's statuses."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="health"),
        options=[("grpc.so_reuseport", 0)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = _bind(
        lambda: server.add_insecure_port(f"{options.host}:{options.health_port}"),
        options.host,
        options.health_port,
        "--health-port",
    )
    return server, port


def start_server(
    options: ServeOptions,
    services: Sequence[Service],
    *,
    registry: CollectorRegistry | None = None,
) -> RunningServer:
    """Build, mount and start a server with health, reflection, metrics and security.

    `registry`: this process's metrics (`lmps.rpc.metrics.process_registry()` with the
    role's series on it), owned by this one server, which adds the RPC series and serves it
    on `metrics_port`; None = a fresh one with the RPC and process series only."""
    sec = load_security() if options.security is None else options.security
    registry = process_registry() if registry is None else registry
    rpc_metrics = RpcMetrics(registry)
    guard = Guard(token=sec.token, limits=sec.limits, rejected=rpc_metrics.rejected)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="rpc"),
        # metrics outermost: refusals are counted too
        interceptors=[_Interceptor(rpc_metrics), guard],
        options=[
            *message_options(sec.limits.max_message_bytes),
            *KEEPALIVE_OPTIONS,
            ("grpc.so_reuseport", 0),
        ],
    )
    for svc in services:
        svc.add(svc.servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [svc.name for svc in services]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{options.host}:{options.port}"
    if sec.tls.serving:
        credentials = sec.tls.server_credentials()
        port = _bind(
            lambda: server.add_secure_port(address, credentials),
            options.host,
            options.port,
            "--port",
        )
    else:
        if sec.tls.ca:
            raise ValueError("LMPS_TLS_CA is set but this server has no LMPS_TLS_CERT/_KEY")
        port = _bind(
            lambda: server.add_insecure_port(address), options.host, options.port, "--port"
        )
    health_server, health_port = None, -1
    if options.health_port >= 0:
        health_server, health_port = _health_only_server(options, health_servicer)
    metrics_port = -1
    if options.metrics_port >= 0:
        try:
            httpd, _ = prometheus_client.start_http_server(
                options.metrics_port, addr=options.host, registry=registry
            )
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(options.host, options.metrics_port, "--metrics-port") from None
        metrics_port = int(httpd.server_port)
    server.start()
    if health_server is not None:
        health_server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    mode = "plaintext"
    if sec.tls.serving:
        mode = "mutual TLS" if sec.tls.client_auth == "require" else "TLS"
    log.info(
        "listening on %s:%d (%s%s; metrics %s; health-only %s): %s",
        options.host,
        port,
        mode,
        ", token required" if sec.token else "",
        metrics_port,
        health_port,
        ", ".join(names),
    )
    if sec.token and not sec.tls.serving:
        log.warning("a token without TLS travels in cleartext: set LMPS_TLS_CERT/_KEY")
    return RunningServer(
        server,
        port,
        metrics_port,
        health_servicer,
        options,
        health_port=health_port,
        health_server=health_server,
        guard=guard,
        registry=registry,
    )


def run_until_signal(running: RunningServer) -> int:
    """Block until SIGTERM/SIGINT, then stop gracefully. Returns the exit code (0)."""
    done = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down (grace %.1fs)", signum, running.options.grace_s)
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    while not done.wait(0.5):
        pass
    running.stop()
    log.info("stopped")
    return 0
