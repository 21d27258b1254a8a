"""Registration registry: who is in the cluster and when we last heard from them. Pure.

Liveness by heartbeat and expiry, as TF2 ParameterServerStrategy's coordinator and ps-lite's
scheduler node (Parameter Server, OSDI'14) track their members.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import Enum

from lmps.core.errors import InvalidArgument, NotFound


class Role(Enum):
    """What a member is; the value prefixes the ids the registry hands out."""

    PS = "ps"
    WORKER = "worker"


@dataclass
class MemberRecord:
    id: str
    role: Role
    address: str
    last_seen: float  # time.monotonic()
    incarnation: str = ""  # changes when the member's process restarts


class Registry:
    """Thread-safe. A member is alive while its last heartbeat is younger than `expiry_s`."""

    def __init__(self, heartbeat_s: float = 2.0, expiry_s: float = 10.0) -> None:
        self.heartbeat_s = heartbeat_s
        self.expiry_s = expiry_s
        self._lock = threading.Lock()
        self._members: dict[str, MemberRecord] = {}
        self._counters = dict.fromkeys(Role, 0)

    def register(
        self, role: Role, address: str, requested_id: str = "", incarnation: str = ""
    ) -> str:
        if not address or ":" not in address:
            raise InvalidArgument(f"register: address must be host:port, got {address!r}")
        with self._lock:
            member_id = requested_id
            if not member_id:
                # First free "<role>-N": stable, readable names for scaled containers.
                while True:
                    member_id = f"{role.value}-{self._counters[role]}"
                    self._counters[role] += 1
                    if member_id not in self._members:
                        break
            old = self._members.get(member_id)
            if old is not None and old.role != role:
                raise InvalidArgument(f"register: id {member_id!r} is taken by a {old.role.value}")
            self._members[member_id] = MemberRecord(
                member_id, role, address, time.monotonic(), incarnation
            )
            return member_id

    def heartbeat(self, member_id: str) -> None:
        with self._lock:
            rec = self._members.get(member_id)
            if rec is None:
                raise NotFound(f"unknown member {member_id!r}; register again")
            rec.last_seen = time.monotonic()

    def alive(self, role: Role) -> list[MemberRecord]:
        """Alive members of `role`, sorted by id."""
        now = time.monotonic()
        with self._lock:
            recs = [
                r
                for r in self._members.values()
                if r.role == role and now - r.last_seen < self.expiry_s
            ]
        return sorted(recs, key=lambda r: r.id)

    def all(self) -> list[tuple[MemberRecord, float, bool]]:
        """(record, seconds since last seen, alive) for everyone."""
        now = time.monotonic()
        with self._lock:
            recs = list(self._members.values())
        return [
            (r, now - r.last_seen, now - r.last_seen < self.expiry_s)
            for r in sorted(recs, key=lambda r: r.id)
        ]

    def find(self, member_id: str) -> MemberRecord | None:
        with self._lock:
            return self._members.get(member_id)

    def is_alive(self, member_id: str) -> bool:
        rec = self.find(member_id)
        return rec is not None and time.monotonic() - rec.last_seen < self.expiry_s
