"""The wire contract as the fuzz tests read it: every RPC and the status codes its proto
comments document.

The allowed codes of an RPC are the status-code names written in (a) the comment above the
`rpc` line, (b) the comments of its request message (above it and inside it) and (c) the
comment block at the top of its .proto file (codes every RPC of the file may return). They
are read from `protos/lmps/v1/*.proto` at test time, so documenting a code in the proto is
all it takes to make the fuzz tests accept it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc

from lmps.v1 import coordinator_pb2, parameter_pb2, worker_pb2

PROTO_DIR = Path(__file__).resolve().parents[2] / "protos" / "lmps" / "v1"

# Every gRPC status code but OK: a comment names a code only to document it.
_CODES = [c.name for c in grpc.StatusCode if c != grpc.StatusCode.OK]
_CODE_RE = re.compile(r"\b(" + "|".join(_CODES) + r")\b")
_RPC_RE = re.compile(r"^\s*rpc\s+(\w+)\s*\(\s*(?:stream\s+)?([\w.]+)\s*\)")
_SERVICE_RE = re.compile(r"^\s*service\s+(\w+)\s*\{")
_MESSAGE_RE = re.compile(r"^\s*message\s+(\w+)\s*\{")

SERVICES: dict[str, ModuleType] = {
    "ParameterService": parameter_pb2,
    "CoordinatorService": coordinator_pb2,
    "WorkerService": worker_pb2,
}


@dataclass(frozen=True)
class Rpc:
    service: str
    method: str
    request: type  # generated request message class
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        return f"{self.service}/{self.method}"

    @property
    def path(self) -> str:
        return f"/lmps.v1.{self.service}/{self.method}"


def all_rpcs() -> list[Rpc]:
    """Every RPC of the three lmps services, from the generated descriptors."""
    out = []
    for service, module in SERVICES.items():
        for m in module.DESCRIPTOR.services_by_name[service].methods:
            request = getattr(_module_of(m.input_type.file.name), m.input_type.name)
            out.append(Rpc(service, m.name, request, m.client_streaming, m.server_streaming))
    return out


def _module_of(proto_file: str) -> ModuleType:
    import importlib

    return importlib.import_module(proto_file.removesuffix(".proto").replace("/", ".") + "_pb2")


def _codes(text: str) -> set[str]:
    return set(_CODE_RE.findall(text))


def _comment(line: str) -> str | None:
    stripped = line.strip()
    return stripped[2:] if stripped.startswith("//") else None


def _parse(text: str) -> tuple[set[str], dict[str, tuple[str, set[str]]], dict[str, set[str]]]:
    """(file-wide codes, rpc "Service/Method" -> (request type, codes), message -> codes)."""
    lines = text.splitlines()
    header: list[str] = []
    for line in lines:
        c = _comment(line)
        if c is None:
            if line.strip():
                break
            continue
        header.append(c)
    rpcs: dict[str, tuple[str, set[str]]] = {}
    messages: dict[str, set[str]] = {}
    pending: list[str] = []  # comment lines right above the current line
    service = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        c = _comment(line)
        if c is not None:
            pending.append(c)
            i += 1
            continue
        if m := _SERVICE_RE.match(line):
            service = m.group(1)
        elif m := _RPC_RE.match(line):
            rpcs[f"{service}/{m.group(1)}"] = (m.group(2).split(".")[-1], _codes(" ".join(pending)))
        elif m := _MESSAGE_RE.match(line):
            # The message's own comment plus every comment inside its braces.
            body, depth = list(pending), 0
            while i < len(lines):
                depth += lines[i].count("{") - lines[i].count("}")
                body.append(lines[i])
                if depth <= 0:
                    break
                i += 1
            messages[m.group(1)] = _codes(" ".join(body))
        pending = []  # a comment documents only the line right below it
        i += 1
    return _codes(" ".join(header)), rpcs, messages


def documented_codes(proto_dir: Path = PROTO_DIR) -> dict[str, frozenset[str]]:
    """ "Service/Method" -> the status codes its proto comments document (OK excluded)."""
    files = [_parse(p.read_text()) for p in sorted(proto_dir.glob("*.proto"))]
    messages: dict[str, set[str]] = {}
    for _, _, msgs in files:
        messages.update(msgs)
    out: dict[str, frozenset[str]] = {}
    for file_codes, rpcs, _ in files:
        for name, (request, codes) in rpcs.items():
            out[name] = frozenset(file_codes | codes | messages.get(request, set()))
    return out
