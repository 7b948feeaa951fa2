"""What a failed RPC means, decided in one place for the library, the CLI, the batch job and the load generator.

The server attaches a google.rpc.Status to every error it sends (server/grpc/status.py): an ErrorInfo whose
reason says what went wrong (QUEUE_FULL, WORD_NOT_IN_ALPHABET, ...) and, when trying again later may succeed,
a RetryInfo with a delay. Decisions are made from those details, never from the message text, so rewording a
message cannot change what a client does. An error without our ErrorInfo did not come from the server's
handlers: it came from the transport (server unreachable or killed, stream reset) or from gRPC's own limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clients.security import definite_tls_failure, tls_failure

ERROR_DOMAIN = "charrnn.v1"
"""ErrorInfo.domain the server uses (server/grpc/status.py); other domains' reasons are not ours to read."""

RETRYABLE_REASONS = frozenset({"QUEUE_FULL", "REQUEST_BYTES_IN_FLIGHT", "MODELS_LOADING", "SHUTTING_DOWN"})
"""Server reasons after which the same request may succeed: later (queue full) or elsewhere (starting, draining)."""

TRANSPORT_RETRYABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,  # not listening, connection refused or lost
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,  # the stream was cancelled under us (not by a server handler)
    grpc.StatusCode.DEADLINE_EXCEEDED,  # no answer in time: a hung or overloaded server
    grpc.StatusCode.INTERNAL,  # e.g. RST_STREAM when the server process died mid-stream
    grpc.StatusCode.UNKNOWN,  # e.g. "Stream removed"
})
"""Codes worth retrying when no server ErrorInfo came with them (the transport failed, not the request)."""

REQUEST_ERROR_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})
"""Codes that say the request itself is wrong: sending it again, anywhere, fails again."""


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """The machine-readable part of a server error: ErrorInfo's reason and metadata, RetryInfo's delay."""

    reason: str | None = None
    """The server's reason (server.core.errors.Reason), or None if the status carried no ErrorInfo of ours."""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None
    """RetryInfo's delay, if the server sent one."""


class CharRnnError(Exception):
    """An RPC failed: `code` is the gRPC status, `details` the server's message, `reason` its ErrorInfo reason."""

    def __init__(self, code: grpc.StatusCode, details: str, info: ErrorDetails | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.info = info or ErrorDetails()

    @property
    def reason(self) -> str | None:
        """The server's machine-readable reason (e.g. QUEUE_FULL), None for transport errors."""
        return self.info.reason

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again later or elsewhere (see is_retryable)."""
        return is_retryable(self.code, self.info)


class ModelNotFoundError(CharRnnError):
    """NOT_FOUND: the server has no model of that name."""


class InvalidArgumentError(CharRnnError):
    """INVALID_ARGUMENT: a bad word, an empty request, or states of the wrong shape."""


class ResourceExhaustedError(CharRnnError):
    """RESOURCE_EXHAUSTED: too many words, too large a message, or the server's queue is full."""


class UnavailableError(CharRnnError):
    """UNAVAILABLE: the server is down, starting, draining, or unreachable (after retries)."""


class DeadlineExceededError(CharRnnError):
    """DEADLINE_EXCEEDED: the call's timeout passed."""


class UnauthenticatedError(CharRnnError):
    """UNAUTHENTICATED: no bearer token, or one the server does not accept (--token-file, $CHARRNN_TOKEN)."""


_ERRORS: dict[grpc.StatusCode, type[CharRnnError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Read the google.rpc.Status details of a failed call; empty if there are none (or none of ours)."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, DecodeError):  # code or message disagree with the call's, or not a Status: not ours
        return ErrorDetails()
    if status is None:
        return ErrorDetails()
    reason: str | None = None
    metadata: dict[str, str] = {}
    retry_after_s: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    return ErrorDetails(reason, metadata, retry_after_s)


def error_from_rpc(error: grpc.RpcError, tls: bool | None = None) -> CharRnnError:
    """The typed exception for a failed RPC, with the server's details. Given whether the channel used TLS,
    a connection failure that TLS explains reads as one line naming the likely cause instead."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details: str = error.details() or ""  # type: ignore[attr-defined]
    if tls is not None and code == grpc.StatusCode.UNAVAILABLE:
        details = tls_failure(details, tls) or details
    return _ERRORS.get(code, CharRnnError)(code, details, error_details(error))


def is_retryable(code: grpc.StatusCode, info: ErrorDetails) -> bool:
    """Whether a failure is worth another try: decided by the server's reason when it sent one, else by the
    code of a transport failure. Never by the message text."""
    if info.reason is not None:
        return info.reason in RETRYABLE_REASONS
    return code in TRANSPORT_RETRYABLE_CODES


def is_rpc_retryable(error: grpc.RpcError) -> bool:
    """is_retryable() of a raw grpc error; a failed TLS handshake is not (retrying cannot fix a wrong CA)."""
    if definite_tls_failure(error.details() or "") is not None:  # type: ignore[attr-defined]
        return False
    return is_retryable(error.code(), error_details(error))  # type: ignore[attr-defined]


def is_request_error(code: grpc.StatusCode) -> bool:
    """Whether the request itself is wrong (bad word, unknown model): the CLI's exit status 2."""
    return code in REQUEST_ERROR_CODES


def error_label(error: grpc.RpcError) -> str:
    """A short, bounded name for a failure, for counting: the code, and the server's reason if it sent one
    (`RESOURCE_EXHAUSTED/QUEUE_FULL`); never the message text."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    reason = error_details(error).reason
    return f"{code.name}/{reason}" if reason else code.name
