"""The lmps image: non-root, `lmps` as the entrypoint, every installed package pinned."""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version "
    "for d in m.distributions()}))"
)


def run(client: docker.DockerClient, image: str, *args: str, entrypoint: str | None = None) -> str:
    out = client.containers.run(image, list(args), entrypoint=entrypoint, remove=True)
    return bytes(out).decode()


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def test_runs_as_non_root_with_lmps_as_entrypoint(
    docker_client: docker.DockerClient, lmps_image: str
) -> None:
    config = docker_client.images.get(lmps_image).attrs["Config"]
    assert config["User"] not in ("", "0", "root", "0:0"), config["User"]
    assert config["Entrypoint"] == ["lmps"], config["Entrypoint"]
    assert run(docker_client, lmps_image, "-u", entrypoint="id").strip() == "10001"
    assert "serve" in run(docker_client, lmps_image, "--help")


def test_every_installed_distribution_is_pinned(
    docker_client: docker.DockerClient, lmps_image: str
) -> None:
    installed = json.loads(
        run(docker_client, lmps_image, "-c", LIST_DISTRIBUTIONS, entrypoint="python")
    )
    lock = pins(REPO / "deploy" / "requirements.lock")
    direct = pins(REPO / "requirements.txt")
    for name, version in direct.items():
        assert lock.get(name) == version, f"deploy/requirements.lock disagrees on {name}"
    assert "lmps" in installed, "the lmps wheel is not installed"
    del installed["lmps"]
    torch_spec = "2.13.0"  # TORCH_SPEC's default in deploy/Dockerfile (a local label may follow)
    assert installed.pop("torch").split("+")[0] == torch_spec
    unpinned = {n: v for n, v in installed.items() if lock.get(n) != v}
    assert not unpinned, (
        f"installed but not pinned by deploy/requirements.lock: {unpinned}; "
        "run deploy/scripts/lock-requirements.sh"
    )
