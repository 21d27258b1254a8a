"""Prometheus metrics of one server process: its own registry, the RPC series every role shares.

Nothing is registered at import. Each `lmps serve ROLE` process builds one `CollectorRegistry`
(`process_registry`), the bootstrap adds the RPC series (`RpcMetrics`) and the role adds its
own (services/ROLE/metrics.py); the /metrics endpoint serves that registry only, so a
parameter server never exports a worker's series, not even as zeros (docs/metrics.md).
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry

REJECT_REASONS = ("unauthenticated", "streams_per_peer", "stream_messages")  # lmps.rpc.guard
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def process_registry() -> CollectorRegistry:
    """A fresh registry with what prometheus_client's default one carries: process_* (CPU,
    resident memory, open files), python_info and python_gc_*."""
    registry = CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    return registry


class RpcMetrics:
    """The series the bootstrap's interceptors keep, on every role."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.total = prometheus_client.Counter(
            "lmps_rpc_total",
            "RPCs handled, by method and final status code",
            ["method", "code"],
            registry=registry,
        )
        self.seconds = prometheus_client.Histogram(
            "lmps_rpc_seconds",
            "Wall time of handled RPCs (streams: until the last message)",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.rejected = prometheus_client.Counter(
            "lmps_rpc_rejected_total",
            "RPCs refused by the server's gate, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in REJECT_REASONS:  # exported as 0 from the start
            self.rejected.labels(reason)
