"""Chaos at the Docker level: `docker kill` a worker container while `docker compose up`
trains; the trainer still finishes and exits 0 (the coordinator drops the worker and gives
its data to the other one)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from tests.docker.compose import ComposeProject

pytestmark = [pytest.mark.docker, pytest.mark.chaos, pytest.mark.timeout(2400)]

TRAIN_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def cluster(compose_project: ComposeProject) -> Iterator[ComposeProject]:
    # More epochs than the demo default, so that the kill lands mid-training; no Prometheus.
    project = replace(
        compose_project,
        env={**compose_project.env, "LMPS_EPOCHS": "4", "COMPOSE_PROFILES": ""},
    )
    project.compose("up", "--detach", "--no-build")
    yield project


def test_docker_kill_a_worker_during_training_trainer_still_exits_zero(
    cluster: ComposeProject,
) -> None:
    trainer = cluster.container("trainer")
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while "initial eval loss" not in cluster.logs(trainer, tail=400):
        assert time.monotonic() < deadline, cluster.all_logs()
        trainer.reload()
        assert trainer.status != "exited", cluster.logs(trainer, tail=200)
        time.sleep(1.0)
    time.sleep(3.0)  # into the first epoch
    victim = cluster.containers("worker")[0]
    victim.kill()  # SIGKILL, as `docker kill` does
    killed_at = time.monotonic()
    code = cluster.wait_exit("trainer", timeout=TRAIN_TIMEOUT_S)
    logs = cluster.logs(trainer, tail=400)
    assert code == 0, f"trainer exited {code}:\n{logs}\n{cluster.all_logs()}"
    assert "lost [" in logs, f"no worker loss was reported:\n{logs}"
    victim.reload()
    assert victim.status == "exited"
    print(
        f"\nFAULT docker kill worker: trainer exited 0, "
        f"{time.monotonic() - killed_at:.0f} s after the kill"
    )
