"""The Grafana dashboard (deploy/grafana/) loads as Grafana needs it and asks only for series
the code defines; the compose `monitoring` profile provisions it (and `grafana`, its older
name); docs/metrics.md and the README describe what is there.

No Grafana server runs here (no image, no package): the dashboard is checked against the
fields Grafana requires of a dashboard and its panels, and every PromQL `expr` against the
metric names collected from the live registries each role builds (lmps/rpc/metrics.py,
services/*/metrics.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

from lmps.rpc.metrics import RpcMetrics, process_registry
from tests.deploy.conftest import REPO, Doc, compose_config

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "lmps.json"
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "text", "row", "heatmap"}
GRID_COLUMNS = 24
# Series Prometheus itself adds to every target.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "info": ("_info",),
}


def role_registries() -> dict[str, prometheus_client.CollectorRegistry]:
    """Each role's registry as its `lmps serve` process builds it (no job, no members)."""
    from lmps.services.coordinator.driver import Driver
    from lmps.services.coordinator.metrics import CoordinatorCollector
    from lmps.services.coordinator.registry import Registry
    from lmps.services.parameter_server.metrics import ServerMetrics
    from lmps.services.worker.metrics import WorkerMetrics

    out = {}
    for role in ("coordinator", "ps", "worker"):
        registry = process_registry()
        RpcMetrics(registry)
        if role == "ps":
            ServerMetrics(registry)
        elif role == "worker":
            WorkerMetrics(registry)
        else:
            members = Registry()
            registry.register(CoordinatorCollector(members, Driver(members, None)))
        out[role] = registry
    return out


def families() -> dict[str, tuple[str, str, set[str]]]:
    """family name -> (type, help, every sample name it can have), over all roles."""
    out: dict[str, tuple[str, str, set[str]]] = {}
    for registry in role_registries().values():
        for family in registry.collect():
            names = {family.name, *(s.name for s in family.samples)}
            names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ())}
            out[family.name] = (family.type, family.documentation, names)
    return out


def defined_names() -> set[str]:
    return {n for _, _, names in families().values() for n in names} | SCRAPE_SERIES


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a small tokenizer, enough for ours)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors ([5m], [$__rate_interval])
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)  # dashboard variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


@pytest.fixture(scope="module")
def dashboard() -> Doc:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: Doc) -> list[Doc]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold theirs
    return out


def exprs(dashboard: Doc) -> list[tuple[str, str]]:
    """(where, PromQL) of every query: panel targets and query variables."""
    out = [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            q = q["query"] if isinstance(q, dict) else q
            inner = re.fullmatch(r"label_values\((.+?)(?:,\s*\w+)?\)", q.strip())
            out.append((f"variable {var['name']}", inner.group(1) if inner else q))
    return out


def test_tokenizer_finds_metric_names() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le, phase) (rate(lmps_worker_phase_seconds_bucket"
        '{job="worker", phase!~"x|y"}[$__rate_interval]))) / on (instance) group_left '
        "max without (le) (lmps_ps_version offset 5m) > bool 2e3"
    )
    assert metric_names(expr) == {"lmps_worker_phase_seconds_bucket", "lmps_ps_version"}


def test_dashboard_has_the_fields_grafana_requires(dashboard: Doc) -> None:
    assert isinstance(dashboard["title"], str) and dashboard["title"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"]), dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert "id" not in dashboard or dashboard["id"] is None  # Grafana assigns it
    assert dashboard["panels"], "no panels"
    ids = [p["id"] for p in panels(dashboard)]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), ids
    cells: set[tuple[int, int]] = set()
    for p in panels(dashboard):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        assert p["type"] in PANEL_TYPES, where
        assert isinstance(p["title"], str) and p["title"], where
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in "hwxy"), where
        assert grid["w"] >= 1 and grid["h"] >= 1, where
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, where
        xs, ys = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not cells & mine, f"{where} overlaps another panel"
        cells |= mine
        if p["type"] in {"row", "text"}:
            continue
        targets = p["targets"]
        assert targets, f"{where}: no targets"
        refs = [t["refId"] for t in targets]
        assert len(set(refs)) == len(refs), f"{where}: refIds {refs}"
        for t in targets:
            assert isinstance(t["expr"], str) and t["expr"].strip(), f"{where}: empty expr"


def test_every_expr_uses_only_defined_metrics(dashboard: Doc) -> None:
    defined = defined_names()
    for where, expr in exprs(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = sorted(names - defined)
        assert not unknown, f"{where}: {expr!r} uses {unknown}, which no role defines"


def test_dashboard_covers_the_training_series(dashboard: Doc) -> None:
    """What issue 8 asks a user to see: loss, step rate, tokens/s, phase times, members,
    leases, failovers/restores, the servers' version and bytes."""
    used = {n for _, e in exprs(dashboard) for n in metric_names(e)}
    for name in (
        "lmps_worker_loss",
        "lmps_coordinator_eval_loss",
        "lmps_ps_updates_total",
        "lmps_worker_tokens_total",
        "lmps_worker_phase_seconds_sum",
        "lmps_coordinator_members_alive",
        "lmps_coordinator_leases_outstanding",
        "lmps_coordinator_failovers_total",
        "lmps_coordinator_restores_total",
        "lmps_ps_version",
        "lmps_ps_parameter_bytes",
    ):
        assert name in used, f"no panel shows {name}"


def test_datasource_uids_are_provisioned(dashboard: Doc) -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert provisioned["apiVersion"] == 1
    uids = {d["uid"] for d in provisioned["datasources"]}
    sources = [p.get("datasource") for p in panels(dashboard)]
    sources += [t.get("datasource") for p in panels(dashboard) for t in p.get("targets", [])]
    sources += [v.get("datasource") for v in dashboard["templating"]["list"]]
    for ds in sources:
        if isinstance(ds, dict):
            assert ds["uid"] in uids and ds["type"] == "prometheus", ds


@pytest.mark.parametrize("profile", ["monitoring", "grafana"])
def test_compose_monitoring_profile_provisions_the_dashboard(profile: str) -> None:
    compose = compose_config(profile)
    services = compose["services"]
    grafana = services["grafana"]
    # Either profile alone brings up both: the dashboard needs its datasource.
    assert profile in services["prometheus"]["profiles"] and profile in grafana["profiles"]
    assert "grafana" not in services["prometheus"].get("depends_on", {})
    mounts = {m["target"]: Path(m["source"]) for m in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards/lmps.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert mounts[path] == DASHBOARD.parent, "the provider's path is not the mounted folder"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"
    source = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    url = source["datasources"][0]["url"]
    prom_port = next(int(p["target"]) for p in services["prometheus"]["ports"])
    assert url == f"http://prometheus:{prom_port}", url


def test_readme_describes_every_panel(dashboard: Doc) -> None:
    readme = (REPO / "README.md").read_text()
    assert "deploy/grafana/dashboards/lmps.json" in readme
    for p in panels(dashboard):
        assert f"**{p['title']}**" in readme, f"README: no description of panel {p['title']!r}"


def test_metric_catalogue_lists_every_lmps_series() -> None:
    """docs/metrics.md has a row per lmps_* family (name, type as the code says), nothing more."""
    doc = (REPO / "docs" / "metrics.md").read_text()
    rows: dict[str, str] = {}
    for line in doc.splitlines():
        m = re.match(r"\|\s*`(lmps_\w+)`\s*\|\s*(\w+)\s*\|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    code: dict[str, Any] = {}
    for name, (kind, _, samples) in families().items():
        if name.startswith("lmps_"):
            shown = name + "_total" if kind == "counter" else name
            assert shown in samples or kind != "counter"
            code[shown] = kind
    assert rows == code, "docs/metrics.md and the code disagree"
