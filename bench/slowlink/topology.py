"""The shaped network of `slowlink`: one namespace per worker, joined through a bridge.

```
  worker ns slw0-TAG            switch ns slsw-TAG                 this (root) namespace
  ┌────────────┐ tbf        tbf ┌──────────────────────┐
  │ sl0 .10    ├────────────────┤ sw0TAG ─┐            │
  └────────────┘                │         ├─ br0 ─ ssTAG├──────── shTAG .1  coordinator,
  ┌────────────┐ tbf        tbf │         │            │ (unshaped)        servers, client
  │ sl0 .11    ├────────────────┤ sw1TAG ─┘            │
  └────────────┘                └──────────────────────┘
```

Each worker's link is a veth pair: `sl0` in the worker's namespace, its peer on a bridge that
lives in a namespace of its own (Docker's iptables FORWARD policy drops bridged traffic in the
root namespace). Both ends carry a `tc tbf` qdisc at the same rate, so a worker sends at most
`rate` (its end's egress) and receives at most `rate` (the bridge end's egress): a worker
with a `rate` NIC, full duplex. Traffic between two workers (DDP's all-reduce) crosses two
shaped links; traffic between a worker and the servers crosses one, then the servers' link.
The servers, the coordinator and the client run in the root namespace behind one more veth
pair to the bridge, unshaped unless asked (`server_shaping`): a parameter server with a
fast NIC, as in the PS papers, and P servers whose NICs would add up anyway.

Byte counters: a `sleep` holder process sits in the switch namespace, so
`/proc/HOLDER/net/dev` lists the bridge ends' counters from here without a subprocess per
read. A bridge end's rx is what its worker sent (after the worker end's tbf) and its tx what
the worker received (after the bridge end's tbf): real bytes on the shaped links, Ethernet
headers included.

Everything is created per `shaped_network` with a random tag and always removed, on errors
and KeyboardInterrupt too. Needs root and iproute2 (`ip`, `tc`); `netem` is not needed
(bandwidth only: this kernel has no netem, so no delay is added).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

WORKER_IF = "sl0"
"""The worker end's name inside each worker's namespace (namespaces have their own names)."""
MIN_BURST = 64 * 1024
"""tbf's bucket: one 64 KiB GSO packet fits whole (a smaller bucket makes tbf segment it)."""
BURST_S = 0.005
"""...or 5 ms at the rate when that is larger (at 100 Mbit/s: 62.5 KB, so 64 KiB)."""


def unavailable() -> str | None:
    """Why the shaped network cannot be built here, or None when it can (so far as one can
    tell without trying: the kernel may still refuse, which `shaped_network` reports)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and tc qdiscs)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2) on PATH"
    return None


class TopologyError(RuntimeError):
    """A step of building the network failed (the kernel or iproute2 refused)."""


@dataclass(frozen=True)
class Shaping:
    """A token bucket on each end of a link (`tc qdisc add dev IF root tbf ...`)."""

    rate_mbit: float = 100.0
    """Rate of each direction, in 10^6 bits per second."""
    burst_bytes: int = 0
    """Bucket size; 0 = max(64 KiB, 5 ms at the rate)."""
    latency_ms: float = 50.0
    """Longest a packet may wait in the queue (tbf's limit = rate x latency + burst): enough
    for TCP to fill the link, short enough not to add much delay."""

    def __post_init__(self) -> None:
        if self.rate_mbit <= 0 or self.latency_ms <= 0 or self.burst_bytes < 0:
            raise ValueError(f"bad shaping {self}")

    @property
    def bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8

    @property
    def burst(self) -> int:
        return self.burst_bytes or max(MIN_BURST, int(self.bytes_per_s * BURST_S))

    def tbf(self) -> list[str]:
        kbit = max(1, round(self.rate_mbit * 1000))
        burst, latency = str(self.burst), f"{self.latency_ms:g}ms"
        return ["tbf", "rate", f"{kbit}kbit", "burst", burst, "latency", latency]


@dataclass(frozen=True)
class WorkerLink:
    netns: str
    """The worker's namespace: run its processes with `ip netns exec NETNS ...`."""
    ip: str
    ifname: str
    """Its end, inside `netns` (`WORKER_IF`)."""
    bridge_if: str
    """The other end, on the bridge in the switch namespace."""

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


@dataclass(frozen=True)
class LinkBytes:
    """Bytes a worker's link carried so far, counted at its bridge end."""

    up: int
    """Sent by the worker."""
    down: int
    """Received by the worker."""


@dataclass
class Topology:
    tag: str
    switch_ns: str
    server_ip: str
    """Where the coordinator and servers listen (this namespace's end of the server link)."""
    server_if: str
    server_bridge_if: str
    workers: list[WorkerLink]
    shaping: Shaping
    server_shaping: Shaping | None
    holder: subprocess.Popen[bytes] | None = None
    namespaces: list[str] = field(default_factory=list)

    def counters(self) -> dict[str, LinkBytes]:
        """Each worker link's bytes so far, by its worker namespace; the servers' link as
        "server" (its up = sent by the servers' side)."""
        assert self.holder is not None
        table = read_net_dev(Path(f"/proc/{self.holder.pid}/net/dev"))
        out = {}
        for link in self.workers:
            rx, tx = table[link.bridge_if]
            out[link.netns] = LinkBytes(up=rx, down=tx)
        rx, tx = table[self.server_bridge_if]
        out["server"] = LinkBytes(up=rx, down=tx)
        return out


def read_net_dev(path: Path) -> dict[str, tuple[int, int]]:
    """`/proc/PID/net/dev` -> {interface: (rx bytes, tx bytes)} of that process's namespace."""
    out = {}
    for line in path.read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        fields = rest.split()
        out[name.strip()] = (int(fields[0]), int(fields[8]))
    return out


def sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise TopologyError(f"`{' '.join(args)}` failed: {done.stderr.strip()}")


def _free_subnet() -> str:
    """A 10.23x.y.0/24 prefix ("10.23x.y") no address or route of this namespace uses."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True)
    addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True)
    text = used.stdout.decode() + addrs.stdout.decode()
    for _ in range(50):
        prefix = f"10.{random.randint(232, 239)}.{random.randint(0, 255)}"
        if f"{prefix}." not in text:
            return prefix
    raise TopologyError("no free 10.232-239.x.0/24 subnet for the shaped network")


@contextmanager
def shaped_network(
    workers: int, shaping: Shaping, server_shaping: Shaping | None = None
) -> Iterator[Topology]:
    """Build the network for `workers` workers, yield it, and always remove it."""
    tag = uuid.uuid4().hex[:6]
    prefix = _free_subnet()
    topo = Topology(
        tag=tag,
        switch_ns=f"slsw-{tag}",
        server_ip=f"{prefix}.1",
        server_if=f"sh{tag}",
        server_bridge_if=f"ss{tag}",
        workers=[
            WorkerLink(f"slw{i}-{tag}", f"{prefix}.{10 + i}", WORKER_IF, f"sw{i}{tag}")
            for i in range(workers)
        ],
        shaping=shaping,
        server_shaping=server_shaping,
    )
    try:
        _build(topo)
        topo.holder = _start_holder(topo)
        yield topo
    finally:
        _remove(topo)


def _build(topo: Topology) -> None:
    sw = topo.switch_ns
    _add_ns(topo, sw)
    sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", sw, "link", "set", "br0", "up")
    for link in topo.workers:
        _add_ns(topo, link.netns)
        tmp = _worker_tmp_if(link)
        sh("ip", "link", "add", tmp, "type", "veth", "peer", "name", link.bridge_if)
        sh("ip", "link", "set", tmp, "netns", link.netns)
        sh("ip", "link", "set", link.bridge_if, "netns", sw)
        sh("ip", "-n", link.netns, "link", "set", tmp, "name", link.ifname)
        sh("ip", "-n", link.netns, "addr", "add", f"{link.ip}/24", "dev", link.ifname)
        sh("ip", "-n", link.netns, "link", "set", link.ifname, "up")
        _attach(sw, link.bridge_if)
        sh("tc", "-n", link.netns, "qdisc", "add", "dev", link.ifname, "root", *topo.shaping.tbf())
        sh("tc", "-n", sw, "qdisc", "add", "dev", link.bridge_if, "root", *topo.shaping.tbf())
    sh("ip", "link", "add", topo.server_if, "type", "veth", "peer", "name", topo.server_bridge_if)
    sh("ip", "link", "set", topo.server_bridge_if, "netns", sw)
    sh("ip", "addr", "add", f"{topo.server_ip}/24", "dev", topo.server_if)
    sh("ip", "link", "set", topo.server_if, "up")
    _attach(sw, topo.server_bridge_if)
    if topo.server_shaping is not None:
        tbf = topo.server_shaping.tbf()
        sh("tc", "qdisc", "add", "dev", topo.server_if, "root", *tbf)
        sh("tc", "-n", sw, "qdisc", "add", "dev", topo.server_bridge_if, "root", *tbf)


def _worker_tmp_if(link: WorkerLink) -> str:
    """The worker end's name until it is moved into the worker's namespace and renamed."""
    return f"sn{link.bridge_if[2:]}"


def _add_ns(topo: Topology, name: str) -> None:
    sh("ip", "netns", "add", name)
    topo.namespaces.append(name)
    sh("ip", "-n", name, "link", "set", "lo", "up")


def _attach(switch_ns: str, ifname: str) -> None:
    sh("ip", "-n", switch_ns, "link", "set", ifname, "master", "br0")
    sh("ip", "-n", switch_ns, "link", "set", ifname, "up")


def _start_holder(topo: Topology) -> subprocess.Popen[bytes]:
    holder = subprocess.Popen(
        ["ip", "netns", "exec", topo.switch_ns, "sleep", "infinity"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    topo.holder = holder
    # Until `ip` has entered the namespace and exec'd sleep, /proc/PID/net/dev is this one's.
    deadline = time.monotonic() + 10
    while True:
        try:
            if topo.server_bridge_if in read_net_dev(Path(f"/proc/{holder.pid}/net/dev")):
                return holder
        except OSError:
            pass
        if holder.poll() is not None or time.monotonic() > deadline:
            raise TopologyError(f"could not start a holder process in {topo.switch_ns}")
        time.sleep(0.02)


def _remove(topo: Topology) -> None:
    """Undo `_build` whatever it got to: deleting a namespace deletes its veth ends, and a
    veth end's peer goes with it; the root end is deleted by name in case it got no peer."""
    if topo.holder is not None:
        topo.holder.kill()
        topo.holder.wait()
    for name in reversed(topo.namespaces):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    # Left in this namespace only when building stopped half-way (deleting either end of a
    # veth pair deletes both; "Cannot find device" for the rest is expected).
    for ifname in [topo.server_if] + [_worker_tmp_if(w) for w in topo.workers]:
        subprocess.run(["ip", "link", "del", ifname], capture_output=True)


class ByteSampler:
    """The worker links' counters every `interval_s`, in a thread: `samples` holds
    (time.time(), {netns: LinkBytes}), so a curve of any contender can be put on bytes."""

    def __init__(self, topo: Topology, interval_s: float = 0.1) -> None:
        self.topo = topo
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, LinkBytes]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slowlink-bytes", daemon=True)

    def sample(self) -> None:
        before = time.time()
        counters = self.topo.counters()
        self.samples.append(((before + time.time()) / 2, counters))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ByteSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def series(self, link: str, direction: str) -> tuple[list[float], list[int]]:
        """(times, bytes so far) of one link's one direction ("up" or "down")."""
        times = [t for t, _ in self.samples]
        return times, [getattr(c[link], direction) for _, c in self.samples]

    def worker_total(self) -> tuple[list[float], list[int]]:
        """(times, bytes so far, both directions of every worker link together)."""
        links = [w.netns for w in self.topo.workers]
        return [t for t, _ in self.samples], [
            sum(c[n].up + c[n].down for n in links) for _, c in self.samples
        ]
