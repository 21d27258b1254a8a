"""Errors that carry a gRPC status code without importing grpc.

Pure code (stores, barriers, validators) raises these; the server bootstrap's interceptor
turns them into the matching gRPC status, so servicers stay thin and never try/except.
The codes are gRPC's canonical status codes (grpc/grpc, doc/statuscodes.md), which say
which failures a client may retry.
"""

from __future__ import annotations


class LmpsError(Exception):
    """Base class; `code` is the name of a `grpc.StatusCode` member."""

    code = "INTERNAL"


class InvalidArgument(LmpsError):
    code = "INVALID_ARGUMENT"


class NotFound(LmpsError):
    code = "NOT_FOUND"


class AlreadyExists(LmpsError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(LmpsError):
    code = "FAILED_PRECONDITION"


class OutOfRange(LmpsError):
    code = "OUT_OF_RANGE"


class Unavailable(LmpsError):
    code = "UNAVAILABLE"


class ResourceExhausted(LmpsError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(LmpsError):
    code = "DEADLINE_EXCEEDED"


class Aborted(LmpsError):
    code = "ABORTED"
