"""A compose project driven by the `docker compose` CLI and inspected with the Docker SDK.

Reusable by any test that needs the containerised cluster (e.g. chaos tests that kill a
container): start it, wait for health, read exit codes, logs and files, and remove every
container, network and volume of the project afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, NotFound
from docker.models.containers import Container

REPO = Path(__file__).resolve().parents[2]
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Drawn below the kernel's ephemeral range (ip_local_port_range), which other processes'
    outgoing connections and port-0 servers take from: the port stays free until compose
    publishes it.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass
class ComposeProject:
    client: docker.DockerClient
    name: str
    env: Mapping[str, str]
    root: Path = REPO
    files: tuple[str, ...] = ("docker-compose.yml",)
    timeline: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ CLI
    def compose(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Run `docker compose -p NAME ARGS...`; raise with its output when it fails."""
        cmd = ["docker", "compose", "-p", self.name, "--project-directory", str(self.root)]
        for f in self.files:
            cmd += ["-f", str(self.root / f)]  # an absolute f stays as it is
        proc = subprocess.run(
            [*cmd, *args],
            cwd=self.root,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"`docker compose {' '.join(args)}` exited {proc.returncode}:\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}\n{self.all_logs()}"
            )
        return proc

    # ------------------------------------------------------------------ SDK
    def containers(self, service: str | None = None) -> list[Container]:
        labels = [f"{PROJECT_LABEL}={self.name}"]
        if service:
            labels.append(f"{SERVICE_LABEL}={service}")
        found = self.client.containers.list(all=True, filters={"label": labels})
        return sorted(found, key=lambda c: c.name)

    def container(self, service: str) -> Container:
        found = self.containers(service)
        assert len(found) == 1, f"{service}: expected one container, found {len(found)}"
        return found[0]

    def logs(self, container: Container, tail: int = 60) -> str:
        try:
            return container.logs(tail=tail, timestamps=True).decode(errors="replace")
        except (APIError, NotFound) as err:
            return f"(no logs: {err})"

    def all_logs(self, tail: int = 40) -> str:
        return "\n".join(
            f"----- {c.name} ({c.status}) -----\n{self.logs(c, tail)}" for c in self.containers()
        )

    def wait_healthy(self, service: str, count: int = 1, timeout: float = 300) -> list[Container]:
        """Wait until `count` containers of `service` report healthy; fail if one exits."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.containers(service)
            for c in found:
                c.reload()
            if len(found) == count and all(_health(c) == "healthy" for c in found):
                return found
            for c in found:
                assert c.status != "exited", (
                    f"{c.name} exited ({c.attrs['State']['ExitCode']}):\n{self.logs(c)}"
                )
            if time.monotonic() > deadline:
                states = ", ".join(f"{c.name}={c.status}/{_health(c)}" for c in found)
                raise AssertionError(
                    f"{service}: {count} healthy not reached in {timeout:.0f}s ({states})\n"
                    f"{self.all_logs()}"
                )
            time.sleep(1)

    def wait_exit(self, service: str, timeout: float) -> int:
        """Wait for the (one-shot) container of `service` to exit; its exit code."""
        container = self.container(service)
        try:
            result = container.wait(timeout=timeout)
        except Exception as err:  # requests' ReadTimeout: the container is still running
            raise AssertionError(
                f"{service} still running after {timeout:.0f}s ({err}):\n{self.all_logs()}"
            ) from err
        return int(result["StatusCode"])

    def read_file(self, service: str, path: str) -> bytes:
        """A file from a (running or exited) container of `service`."""
        stream, _ = self.container(service).get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            assert member is not None and member.isfile(), f"{path} is not a file"
            extracted = tar.extractfile(member)
            assert extracted is not None
            return extracted.read()

    def published(self, service: str, port: int, index: int = 0) -> int:
        """The host port a container of `service` publishes `port`/tcp on."""
        c = self.containers(service)[index]
        c.reload()
        bindings = c.attrs["NetworkSettings"]["Ports"].get(f"{port}/tcp") or []
        assert bindings, f"{c.name} does not publish {port}"
        return int(bindings[0]["HostPort"])

    def exit_codes_during(self, action: Callable[[], Any]) -> dict[str, int]:
        """Run `action` and collect the exit code of every container that dies meanwhile."""
        codes: dict[str, int] = {}
        since = time.time() - 1
        done = threading.Event()
        events = self.client.events(
            decode=True,
            since=int(since),
            filters={"label": f"{PROJECT_LABEL}={self.name}", "event": "die"},
        )

        def collect() -> None:
            for event in events:
                attrs = event.get("Actor", {}).get("Attributes", {})
                codes[attrs.get("name", "?")] = int(attrs.get("exitCode", -1))
                if done.is_set():
                    break

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        try:
            action()
            time.sleep(2)  # let the engine deliver the last events
        finally:
            done.set()
            events.close()
            reader.join(timeout=5)
        return codes

    # ------------------------------------------------------------------ cleanup
    def remove(self) -> None:
        """Remove everything of the project, whatever state it is in (never raises)."""
        try:
            self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=180)
        except Exception as err:
            print(f"compose down failed ({err}); removing with the SDK")
        label = {"label": f"{PROJECT_LABEL}={self.name}"}
        for c in self.client.containers.list(all=True, filters=label):
            _quietly(functools.partial(c.remove, force=True, v=True))
        for n in self.client.networks.list(filters=label):
            _quietly(n.remove)
        for v in self.client.volumes.list(filters=label):
            _quietly(functools.partial(v.remove, force=True))


def _health(container: Container) -> str:
    return str(container.attrs["State"].get("Health", {}).get("Status", "none"))


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except (APIError, NotFound) as err:
        print(f"cleanup: {err}")
