"""docker-compose.yml and deploy/k8s (cpu overlay) run the same image, commands, ports and env.

Each compose service is compared with the Kubernetes container that plays its role, after
resolving compose's interpolation (`docker compose config`) and Kubernetes' $(VAR) expansion
of args. The differences that must exist are spelled out here, nothing else may differ:
  * a parameter server advertises `ps-N:50061` in compose and `ps-N.ps:50061` in Kubernetes
    (its name under the headless Service);
  * the compose trainer uses every worker (`--workers 0`: compose starts it once all worker
    replicas are healthy); the Kubernetes trainer waits for exactly the worker replicas;
  * Kubernetes adds POD_NAME (downward API) and the optional LMPS_AUTH_TOKEN Secret slot.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import REPO, Doc, find, pod_spec
from tests.deploy.test_k8s import env_of

K8S_ONLY_ENV = {"POD_NAME", "LMPS_AUTH_TOKEN"}
# compose service -> (kind, name, POD_NAME) of the Kubernetes workload in that role
ROLES = {
    "coordinator": ("Deployment", "coordinator", "coordinator"),
    "ps-0": ("StatefulSet", "ps", "ps-0"),
    "ps-1": ("StatefulSet", "ps", "ps-1"),
    "worker": ("Deployment", "worker", "worker"),
    "trainer": ("Job", "trainer", "trainer"),
}


def k8s_container(docs: list[Doc], service: str) -> tuple[Doc, dict[str, Any], list[str]]:
    """(container, env, args with $(VAR) expanded) of the Kubernetes side of `service`."""
    kind, name, pod_name = ROLES[service]
    container = pod_spec(find(docs, kind, name))["containers"][0]
    env = {k: v for k, v in env_of(docs, container).items() if k not in K8S_ONLY_ENV}
    variables = {**env, "POD_NAME": pod_name}

    def expand(arg: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: str(variables[m.group(1)]), arg)

    return container, env, [expand(a) for a in container["args"]]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def without(args: list[str], name: str) -> list[str]:
    i = args.index(name)
    return args[:i] + args[i + 2 :]


def test_every_role_exists_on_both_sides(compose: Doc, cpu_docs: list[Doc]) -> None:
    lmps_services = {name for name, s in compose["services"].items() if s["image"] == "lmps:latest"}
    assert lmps_services == set(ROLES)
    for service in ROLES:
        k8s_container(cpu_docs, service)


def test_same_image(compose: Doc, cpu_docs: list[Doc]) -> None:
    for service in ROLES:
        container, _, _ = k8s_container(cpu_docs, service)
        assert container["image"] == compose["services"][service]["image"] == "lmps:latest"


def test_same_commands(compose: Doc, cpu_docs: list[Doc]) -> None:
    for service in ROLES:
        ours = list(compose["services"][service]["command"])
        _, env, theirs = k8s_container(cpu_docs, service)
        if service.startswith("ps-"):
            assert flag(ours, "--advertise") == f"{service}:50061"
            assert flag(theirs, "--advertise") == f"{service}.ps:50061"
            ours, theirs = without(ours, "--advertise"), without(theirs, "--advertise")
        if service == "trainer":
            assert flag(ours, "--workers") == "0"
            replicas = find(cpu_docs, "Deployment", "worker")["spec"]["replicas"]
            assert flag(theirs, "--workers") == str(replicas) == env["LMPS_WORKERS"]
            ours, theirs = without(ours, "--workers"), without(theirs, "--workers")
        assert ours == theirs, f"{service}: compose {ours} != kubernetes {theirs}"


def test_same_env(compose: Doc, cpu_docs: list[Doc]) -> None:
    for service in ROLES:
        ours = dict(compose["services"][service].get("environment") or {})
        _, theirs, _ = k8s_container(cpu_docs, service)
        if service == "trainer":  # minus the job config, compared as the args it expands into
            theirs = {k: v for k, v in theirs.items() if k not in _job_keys(cpu_docs)}
        assert ours == theirs, f"{service}: compose {ours} != kubernetes {theirs}"


def _job_keys(docs: list[Doc]) -> set[str]:
    trainer = pod_spec(find(docs, "Job", "trainer"))["containers"][0]
    job_maps = [s["configMapRef"]["name"] for s in trainer["envFrom"]]
    return {
        key
        for name in job_maps
        if name.startswith("lmps-job")
        for key in find(docs, "ConfigMap", name)["data"]
    }


def test_same_ports_and_health_checks(compose: Doc, cpu_docs: list[Doc]) -> None:
    for service in ROLES:
        spec = compose["services"][service]
        container, _, args = k8s_container(cpu_docs, service)
        ours = {int(p["target"]) for p in spec.get("ports", [])}
        theirs = {int(p["containerPort"]) for p in container.get("ports", [])}
        assert ours == theirs, f"{service}: compose {ours} != kubernetes {theirs}"
        if service == "trainer":
            continue
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert flag(args, "--port") == str(ports["grpc"])
        assert flag(args, "--metrics-port") == str(ports["metrics"])
        assert spec["healthcheck"]["test"] == [
            "CMD",
            "lmps",
            "health",
            f"127.0.0.1:{ports['grpc']}",
        ]
        assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]


def test_same_scale_and_grace(compose: Doc, cpu_docs: list[Doc]) -> None:
    services = compose["services"]
    assert (
        services["worker"]["deploy"]["replicas"]
        == find(cpu_docs, "Deployment", "worker")["spec"]["replicas"]
    )
    compose_ps = [name for name in services if name.startswith("ps-")]
    assert len(compose_ps) == find(cpu_docs, "StatefulSet", "ps")["spec"]["replicas"]
    for service in ROLES:
        kind, name, _ = ROLES[service]
        grace = pod_spec(find(cpu_docs, kind, name))["terminationGracePeriodSeconds"]
        assert services[service]["stop_grace_period"] == f"{grace}s", service


def test_prometheus_scrapes_the_metrics_ports(compose: Doc) -> None:
    config = yaml.safe_load(Path(REPO / "deploy/prometheus/prometheus.yml").read_text())
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                scraped[name] = sd["port"]
    for service in ("coordinator", "ps-0", "ps-1", "worker"):
        args = compose["services"][service]["command"]
        assert scraped.get(service) == int(flag(args, "--metrics-port")), service
    assert "monitoring" in compose["services"]["prometheus"]["profiles"]


def test_same_persistent_paths(compose: Doc, cpu_docs: list[Doc]) -> None:
    """What compose keeps in named volumes, Kubernetes keeps on PersistentVolumeClaims."""
    for service in ROLES:
        mounts = compose["services"][service].get("volumes", [])
        ours = {m["target"] for m in mounts if m["type"] == "volume"}
        kind, name, _ = ROLES[service]
        spec = pod_spec(find(cpu_docs, kind, name))
        claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
        container = spec["containers"][0]
        theirs = {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in claims}
        assert ours == theirs, f"{service}: compose {ours} != kubernetes {theirs}"
    assert "--state-dir" in compose["services"]["coordinator"]["command"]
