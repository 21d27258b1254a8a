"""deploy/k8s: every overlay renders, passes kubernetes-validate, and has the required shape."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate import utils as kv_utils

from tests.deploy.conftest import Doc, find, pod_spec, workloads

# The newest Kubernetes release kubernetes-validate knows (a current one: it is pinned in
# requirements-dev.txt and updated with it); plus the oldest we claim (native gRPC probes
# are GA since 1.27).
K8S_VERSIONS = [kv_utils.latest_version(), "1.29.0"]
GRACE_S = 5  # LMPS_GRACE_S in the lmps-env ConfigMap (checked below)


def validate(doc: Doc, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_passes_kubernetes_validate(overlay: tuple[str, list[Doc]], version: str) -> None:
    name, docs = overlay
    assert docs, f"{name} rendered nothing"
    for doc in docs:
        try:
            validate(doc, version)
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(
                f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes "
                f"{version}: {err.message} at {list(err.path)}"
            ) from err


def test_validator_rejects_a_misspelt_field(cpu_docs: list[Doc]) -> None:
    """The check above can fail: strict validation catches an unknown field."""
    broken = copy.deepcopy(find(cpu_docs, "StatefulSet", "ps"))
    broken["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken, K8S_VERSIONS[0])


def env_of(docs: list[Doc], container: Doc) -> dict[str, Any]:
    """A container's env: its envFrom ConfigMaps, then its own entries (value or source)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def test_every_overlay_has_the_required_objects(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    ps = find(docs, "StatefulSet", "ps")
    headless = find(docs, "Service", ps["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert (
        headless["spec"]["selector"].items() <= ps["spec"]["template"]["metadata"]["labels"].items()
    )
    coordinator = find(docs, "Deployment", "coordinator")
    service = find(docs, "Service", "coordinator")
    assert (
        service["spec"]["selector"].items()
        <= coordinator["spec"]["template"]["metadata"]["labels"].items()
    )
    assert {p["port"] for p in service["spec"]["ports"]} == {50051, 9100}
    find(docs, "Deployment", "worker")
    job = find(docs, "Job", "trainer")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(job)["volumes"]]
    for claim in claims:
        find(docs, "PersistentVolumeClaim", claim)
    assert claims, "the trainer writes to no PVC"
    trainer = pod_spec(job)["containers"][0]
    assert {"LMPS_PRESET", "LMPS_EPOCHS", "LMPS_WORKERS"} <= env_of(docs, trainer).keys()


def test_services_probe_grpc_health_and_outlive_their_grace(
    overlay: tuple[str, list[Doc]],
) -> None:
    _, docs = overlay
    for workload in workloads(docs):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec["terminationGracePeriodSeconds"] > GRACE_S, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            env = env_of(docs, container)
            assert env.get("LMPS_GRACE_S") == str(GRACE_S), (name, env)
            # Secret slot: the token comes from an optional Secret (absent = no auth).
            token = env.get("LMPS_AUTH_TOKEN")
            assert token == {
                "secretKeyRef": {"name": "lmps-auth", "key": "token", "optional": True}
            }, (name, token)
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), name
            assert {"cpu", "memory"} <= resources["limits"].keys(), name
            if workload["kind"] == "Job":
                continue
            grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == grpc_port, (name, probe)


def test_gpu_overlay_puts_workers_on_gpu_nodes(gpu_docs: list[Doc]) -> None:
    worker = pod_spec(find(gpu_docs, "Deployment", "worker"))
    container = worker["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(gpu_docs, container)["LMPS_DEVICE"] == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in worker["tolerations"])
    assert worker["nodeSelector"], "no nodeSelector for GPU nodes"
    assert container["image"].endswith(":cuda"), container["image"]
    for workload in workloads(gpu_docs):
        if workload["metadata"]["name"] != "worker":
            assert "nvidia.com/gpu" not in str(pod_spec(workload)), workload["metadata"]["name"]


def test_cpu_overlay_asks_for_no_gpu(cpu_docs: list[Doc]) -> None:
    assert "nvidia.com" not in str(cpu_docs)
    container = pod_spec(find(cpu_docs, "Deployment", "worker"))["containers"][0]
    assert env_of(cpu_docs, container)["LMPS_DEVICE"] == "cpu"
