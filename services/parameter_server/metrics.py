"""The parameter server's Prometheus series (lmps_ps_*), registered when a server is built.

Nothing is registered at import: `lmps serve ps` makes one `ServerMetrics` on its process
registry (`lmps.rpc.metrics.process_registry`), so other roles never export these.
Catalogue: docs/metrics.md.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """`registry`: the one /metrics serves; None = a private one nobody scrapes (tests)."""
        r = CollectorRegistry() if registry is None else registry
        self.version = prometheus_client.Gauge(
            "lmps_ps_version", "Parameter version (optimizer steps applied)", registry=r
        )
        self.pushes = prometheus_client.Counter(
            "lmps_ps_pushes_total", "Accepted gradient pushes", registry=r
        )
        self.applies = prometheus_client.Counter(
            "lmps_ps_updates_total", "Optimizer steps applied", registry=r
        )
        self.pulled_bytes = prometheus_client.Counter(
            "lmps_ps_pulled_bytes_total", "Parameter bytes sent", registry=r
        )
        self.pushed_bytes = prometheus_client.Counter(
            "lmps_ps_pushed_bytes_total", "Gradient bytes received", registry=r
        )
        self.staleness = prometheus_client.Histogram(
            "lmps_ps_push_staleness_steps",
            "Versions between the one an accepted push was computed at and the one it is "
            "applied at: its step (0 under SYNC, at most max_staleness under bounded "
            "staleness), or under ASYNC this server's version when it applied the push",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1000),
            registry=r,
        )
        self.held_bytes = prometheus_client.Gauge(
            "lmps_ps_parameter_bytes", "fp32 parameter bytes held", registry=r
        )
