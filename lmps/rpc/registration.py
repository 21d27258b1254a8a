"""Register with the coordinator and keep the membership alive with heartbeats.

As ps-lite's nodes do with its scheduler (src/van.cc: ADD_NODE on start, then a heartbeat
thread; the scheduler counts a node dead when its heartbeats stop), a server or worker
registers its address and role, then heartbeats; the coordinator expires silent members.
"""

from __future__ import annotations

import logging
import threading
import uuid

import grpc

from lmps.rpc.channel import DEFAULT_TIMEOUT_S, open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger("lmps.rpc.registration")


class Registration:
    """Registers `address` under `role`; a daemon thread heartbeats and re-registers as needed."""

    def __init__(
        self, coordinator: str, role: coordinator_pb2.Role, address: str, requested_id: str = ""
    ) -> None:
        self.coordinator = coordinator
        self.role = role
        self.address = address
        self.id = requested_id
        self.incarnation = uuid.uuid4().hex
        self.interval_s = 2.0
        self._channel = open_channel(coordinator)
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def register(self, timeout_s: float = 120.0) -> str:
        """Blocks until the coordinator answers (wait_for_ready), returns the member id."""
        resp = self._stub.Register(
            coordinator_pb2.RegisterRequest(
                role=self.role, address=self.address, id=self.id, incarnation=self.incarnation
            ),
            timeout=timeout_s,
            wait_for_ready=True,
        )
        self.id = resp.id
        self.interval_s = resp.heartbeat_interval_s or 2.0
        log.info("registered with %s as %s (%s)", self.coordinator, self.id, self.address)
        return self.id

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._stub.Heartbeat(
                    coordinator_pb2.HeartbeatRequest(id=self.id), timeout=DEFAULT_TIMEOUT_S
                )
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    # The coordinator restarted or expired us: announce ourselves again.
                    try:
                        self.register(timeout_s=DEFAULT_TIMEOUT_S)
                    except grpc.RpcError as again:
                        log.warning("re-register failed: %s", again.code())
                else:
                    log.warning("heartbeat to %s failed: %s", self.coordinator, err.code())

    def stop(self) -> None:
        self._stop.set()
        self._channel.close()
