"""Domain errors and their one mapping to gRPC status codes.

Stream-ending errors are raised as `ServiceError` subclasses and turned into a
status by the servicer; errors a session survives become an in-stream `Error`
event (see `service.session`).
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with a gRPC status; `field` names the request field at fault."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def code_name(self) -> str:
        return self.code.name


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception that ends a call."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


class Undecodable:
    """Stands in for a request whose bytes are not a valid message of its type.

    The server's request deserializers return one instead of raising, so the
    handler answers INVALID_ARGUMENT at whatever point of the stream it arrives
    (grpc would otherwise end the call with UNKNOWN and log a traceback)."""

    __slots__ = ("message_type", "size")

    def __init__(self, message_type: str, size: int) -> None:
        self.message_type = message_type
        self.size = size

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"not a valid {self.message_type} ({self.size} bytes that do not parse)")


class StartupError(Exception):
    """The server cannot start as configured (TLS files, listening address).

    `python -m service` logs its message as one line and exits with status 2."""
