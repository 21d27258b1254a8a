"""The worker's Prometheus series (lmps_worker_*), registered when a worker is built.

Nothing is registered at import: `lmps serve worker` makes one `WorkerMetrics` on its
process registry (`lmps.rpc.metrics.process_registry`), so other roles never export these.
Catalogue: docs/metrics.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from lmps.services.worker.trainer import StepResult

PHASES = ("pull", "compute", "push")
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """`registry`: the one /metrics serves; None = a private one nobody scrapes (tests)."""
        r = CollectorRegistry() if registry is None else registry
        self.steps = prometheus_client.Counter(
            "lmps_worker_steps_total", "Training steps computed", registry=r
        )
        self.tokens = prometheus_client.Counter(
            "lmps_worker_tokens_total", "Training tokens processed", registry=r
        )
        self.loss = prometheus_client.Gauge("lmps_worker_loss", "Loss of the last step", registry=r)
        self.grad_norm = prometheus_client.Gauge(
            "lmps_worker_grad_norm",
            "Global gradient norm of the last step, before clipping (0 with clipping off)",
            registry=r,
        )
        self.phase = prometheus_client.Histogram(
            "lmps_worker_phase_seconds",
            "Time per step phase",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        for phase in PHASES:  # exported from the start, not from the first step
            self.phase.labels(phase)

    def observe(self, r: StepResult) -> None:
        """One training step done."""
        self.steps.inc()
        self.tokens.inc(r.tokens)
        self.loss.set(r.loss)
        self.grad_norm.set(r.grad_norm)
        self.phase.labels("pull").observe(r.pull_s)
        self.phase.labels("compute").observe(r.compute_s)
        self.phase.labels("push").observe(r.push_s)
