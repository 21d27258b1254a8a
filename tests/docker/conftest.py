"""Fixtures for tests that drive a real Docker engine: the engine, the images, a compose project.

Docker is driven through the `docker` Python SDK (health, exit codes, logs, events) and the
`docker compose` v2 CLI (the thing users run). Everything a test creates belongs to one
compose project with a unique name and is removed afterwards, also when the test fails.

Where no engine answers the tests are skipped with the reason, except under CI (CI set),
where `deploy/scripts/setup-docker.sh` has run and a missing engine is a failure.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from docker.errors import DockerException

from tests.docker.compose import REPO, ComposeProject, free_port

IMAGE_BUILD_TIMEOUT_S = 1500  # a fresh machine: debootstrap base + wheelhouse + image


def unavailable(reason: str) -> None:
    """Skip (a developer machine without Docker) or fail (CI, where Docker was set up)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI: deploy/scripts/setup-docker.sh should have provided it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as err:
        unavailable(f"no Docker engine reachable ({err}); run deploy/scripts/setup-docker.sh")
    proc = subprocess.run(
        ["docker", "compose", "version", "--short"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        unavailable("`docker compose` (v2) is missing; run deploy/scripts/setup-docker.sh")
    try:
        yield client
    finally:
        client.close()


def _run_script(script: str, env: dict[str, str]) -> str:
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", f"deploy/scripts/{script}"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=IMAGE_BUILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
    )
    print(f"\n{script}: {time.monotonic() - t0:.0f} s; {proc.stdout.strip()}")
    return proc.stdout.strip()


@pytest.fixture(scope="session")
def lmps_image(docker_client: docker.DockerClient) -> str:
    """The lmps image built from this tree (`make image`; cached layers make reruns fast)."""
    tag = os.environ.get("LMPS_IMAGE", "lmps:latest")
    _run_script("build-image.sh", {"LMPS_IMAGE": tag})
    docker_client.images.get(tag)
    return tag


@pytest.fixture(scope="session")
def prometheus_image(docker_client: docker.DockerClient) -> str:
    """A Prometheus image: the official one when it can be pulled, else one from Debian's."""
    return _run_script("build-prometheus-image.sh", {}).splitlines()[-1]


@pytest.fixture(scope="module")
def compose_project(
    docker_client: docker.DockerClient, lmps_image: str, prometheus_image: str
) -> Iterator[ComposeProject]:
    """A not yet started compose project of docker-compose.yml on free host ports."""
    ports = {
        name: str(free_port())
        for name in (
            "COORDINATOR",
            "COORDINATOR_METRICS",
            "PS0",
            "PS0_METRICS",
            "PS1",
            "PS1_METRICS",
            "PROMETHEUS",
        )
    }
    env = {f"LMPS_PUBLISH_{name}": port for name, port in ports.items()}
    env.update(
        LMPS_IMAGE=lmps_image,
        PROMETHEUS_IMAGE=prometheus_image,
        LMPS_BIND="127.0.0.1",
        COMPOSE_PROFILES="monitoring",
    )
    # LMPS_COMPOSE_OVERRIDES: extra compose files (os.pathsep-separated) layered on top.
    overrides = [f for f in os.environ.get("LMPS_COMPOSE_OVERRIDES", "").split(os.pathsep) if f]
    project = ComposeProject(
        docker_client,
        name=f"lmpstest{uuid.uuid4().hex[:8]}",
        env=env,
        root=Path(REPO),
        files=("docker-compose.yml", *overrides),
    )
    try:
        yield project
    finally:
        project.remove()
