"""The layers hold: the pure ML core never needs grpc, generated protobuf code or the RPC
runtime (issue 7, item 2; DESIGN.md: "pure tensor/model/optimizer/sharding code never
imports grpc or generated code").

Each check imports modules in a fresh interpreter whose import system refuses grpc (and
grpc_health, grpc_reflection, ...), `lmps.v1` and `lmps.rpc`, so an import anywhere below
the module, however indirect, fails the test.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from typing import Any

import lmps.core

CORE = sorted(f"lmps.core.{m.name}" for m in pkgutil.iter_modules(lmps.core.__path__))

# The services' domain rooms, which servicers wrap: plain Python + torch, no wire. Edit
# this list when a room is added, renamed or split.
PURE_SERVICE_MODULES = [
    "lmps.services.parameter_server.store",
    "lmps.services.parameter_server.consistency",
    "lmps.services.coordinator.leases",
    "lmps.services.coordinator.checkpoint",
    "lmps.services.worker.replica",
    "lmps.services.worker.trainer",
]

BLOCKED = ("grpc", "lmps.v1", "lmps.rpc")

IMPORT_BLOCKED = """
import importlib, json, sys

BLOCKED = {blocked!r}


class Refuse:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top.startswith("grpc") or any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is blocked in this test")
        return None


sys.meta_path.insert(0, Refuse())
errors = {{}}
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except ImportError as err:
        errors[module] = repr(err)
loaded = sorted(m for m in sys.modules if m.startswith(("grpc", "lmps.v1", "lmps.rpc")))
print(json.dumps({{"errors": errors, "loaded": loaded}}))
"""


def import_blocked(modules: list[str]) -> dict[str, Any]:
    script = IMPORT_BLOCKED.format(blocked=BLOCKED, modules=modules)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_the_blocker_blocks() -> None:
    result = import_blocked(["lmps.rpc.codec", "grpc"])
    assert set(result["errors"]) == {"lmps.rpc.codec", "grpc"}


def test_core_modules_import_without_grpc_or_the_runtime() -> None:
    assert {"lmps.core.model", "lmps.core.optim", "lmps.core.partition"} <= set(CORE)
    result = import_blocked(CORE)
    assert result == {"errors": {}, "loaded": []}


def test_service_domain_modules_import_without_grpc() -> None:
    # One interpreter for all (torch takes seconds to import); errors are per module.
    result = import_blocked(PURE_SERVICE_MODULES)
    assert result == {"errors": {}, "loaded": []}


WITHOUT_TRANSFORMERS = """
import importlib, json, sys


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, Refuse())
errors = {}
for module in MODULES:
    try:
        importlib.import_module(module)
    except ImportError as err:
        errors[module] = repr(err)
print(json.dumps({"errors": errors, "loaded": "transformers" in sys.modules}))
"""


def test_lmps_and_the_services_import_without_transformers() -> None:
    """`transformers` is the `hf` extra, not a dependency: only `lmps.client.hf_io` needs
    it, and only when it is called (issue 11)."""
    modules = [
        "lmps",
        *CORE,
        "lmps.rpc.codec",
        "lmps.services.coordinator.main",
        "lmps.services.parameter_server.main",
        "lmps.services.worker.main",
        "lmps.client.cli",
        "lmps.client.commands",
        "lmps.client.train",
        "lmps.client.model_io",
        "lmps.client.hf_io",
    ]
    script = WITHOUT_TRANSFORMERS.replace("MODULES", repr(modules))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"errors": {}, "loaded": False}
