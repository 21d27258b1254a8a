"""Metrics are registered when a process builds its role, never at import.

Under `lmps serve` one process may import every role's modules; before, each import added
its role's series to prometheus_client's default registry, so every process exported every
role's metrics (as zeros). Catalogue: docs/metrics.md.
"""

from __future__ import annotations

import importlib

import prometheus_client
import pytest

from lmps.rpc.metrics import RpcMetrics, process_registry

MODULES = [
    "lmps.rpc.bootstrap",
    "lmps.rpc.guard",
    "lmps.rpc.metrics",
    "lmps.client.cli",
    "lmps.services.coordinator.main",
    "lmps.services.coordinator.metrics",
    "lmps.services.coordinator.servicer",
    "lmps.services.parameter_server.main",
    "lmps.services.parameter_server.metrics",
    "lmps.services.parameter_server.servicer",
    "lmps.services.worker.main",
    "lmps.services.worker.metrics",
    "lmps.services.worker.servicer",
]


def lmps_names(registry: prometheus_client.CollectorRegistry) -> list[str]:
    return sorted(
        {s.name for f in registry.collect() for s in f.samples if s.name.startswith("lmps_")}
    )


def test_importing_every_module_registers_nothing() -> None:
    for name in MODULES:
        importlib.import_module(name)
    assert lmps_names(prometheus_client.REGISTRY) == []


def test_two_servers_in_one_process_keep_separate_series() -> None:
    """Each server owns its registry: building a role twice in a process is no clash."""
    from lmps.services.parameter_server.metrics import ServerMetrics

    a, b = process_registry(), process_registry()
    ServerMetrics(a).applies.inc(3)
    ServerMetrics(b)
    RpcMetrics(a), RpcMetrics(b)
    assert a.get_sample_value("lmps_ps_updates_total") == 3
    assert b.get_sample_value("lmps_ps_updates_total") == 0
    assert a.get_sample_value("process_resident_memory_bytes") is not None
    with pytest.raises(ValueError, match="Duplicated"):
        ServerMetrics(a)  # one registry, one role


def test_coordinator_collector_reads_the_registry_and_jobs() -> None:
    from lmps.services.coordinator.driver import Driver
    from lmps.services.coordinator.metrics import CoordinatorCollector
    from lmps.services.coordinator.registry import Registry, Role

    members = Registry()
    members.register(Role.PS, "127.0.0.1:1")
    members.register(Role.WORKER, "127.0.0.1:2")
    members.register(Role.WORKER, "127.0.0.1:3")
    driver = Driver(members, None)
    registry = prometheus_client.CollectorRegistry()
    registry.register(CoordinatorCollector(members, driver))
    alive = "lmps_coordinator_members_alive"
    assert registry.get_sample_value(alive, {"role": "ps"}) == 1
    assert registry.get_sample_value(alive, {"role": "worker"}) == 2
    assert registry.get_sample_value("lmps_coordinator_restores_total") == 0
    driver.placement.restores += 1
    assert registry.get_sample_value("lmps_coordinator_restores_total") == 1
    assert registry.get_sample_value("lmps_coordinator_step") is None  # no job yet
