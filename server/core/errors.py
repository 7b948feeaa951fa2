"""Errors the core reports to callers, each with a machine-readable reason; anything else is a bug.

The core knows nothing of the wire: a front end maps each error's kind to its own status (server/grpc/status.py
for gRPC) and sends the reason along (google.rpc.ErrorInfo), so that clients decide from the reason, never
from the message text. Reasons are stable API; messages may be reworded.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a request failed, as ErrorInfo.reason (UPPER_SNAKE_CASE, as google.rpc.ErrorInfo asks)."""

    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    VERSION_NOT_FOUND = "VERSION_NOT_FOUND"
    NO_WORDS = "NO_WORDS"
    WORD_EMPTY = "WORD_EMPTY"
    WORD_TOO_LONG = "WORD_TOO_LONG"
    WORD_NOT_IN_ALPHABET = "WORD_NOT_IN_ALPHABET"
    INVALID_STATE = "INVALID_STATE"
    INVALID_REQUEST = "INVALID_REQUEST"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    """The request's bytes are not a valid message of the RPC's request type."""
    TOO_MANY_WORDS = "TOO_MANY_WORDS"
    REQUEST_BYTES_IN_FLIGHT = "REQUEST_BYTES_IN_FLIGHT"
    """Requests being decoded or queued already hold the server's byte budget; retry after a pause."""
    QUEUE_FULL = "QUEUE_FULL"
    MODELS_LOADING = "MODELS_LOADING"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    """No bearer token, or one the server does not know (the same reason for both)."""
    INTERNAL = "INTERNAL"


class ErrorKind(StrEnum):
    """What sort of failure an error is; each front end maps a kind to one status of its protocol."""

    NOT_FOUND = "not_found"
    """The request names something that does not exist."""
    INVALID = "invalid"
    """The request itself is wrong; sending it again will fail again."""
    TOO_LARGE = "too_large"
    """The request asks for more than the limits allow."""
    OVERLOADED = "overloaded"
    """The server is busy; the same request may succeed after a pause."""
    UNAVAILABLE = "unavailable"
    """The server cannot take work now (starting, draining); another replica or a later try may."""
    UNAUTHENTICATED = "unauthenticated"
    """The caller did not prove who it is (no token, or a wrong one)."""
    INTERNAL = "internal"
    """A bug: the details are in the server log only."""


class ServiceError(Exception):
    """Base of every error a client is told about: its kind, its reason and a short message."""

    kind: ErrorKind = ErrorKind.INTERNAL
    reason: Reason = Reason.INTERNAL
    retry_after_s: float | None = None
    """For a retryable error, how long a client should wait before it tries again."""

    def __init__(self, message: str, reason: Reason | None = None, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = metadata or {}
        """Machine-readable facts about the failure (ErrorInfo.metadata): short strings, never the whole input."""


class ModelNotFoundError(ServiceError):
    """The request names a model the server has not loaded."""

    kind = ErrorKind.NOT_FOUND
    reason = Reason.MODEL_NOT_FOUND


class VersionNotFoundError(ModelNotFoundError):
    """The request names a version of a loaded model that is not loaded (never was, failed, or was unloaded)."""

    reason = Reason.VERSION_NOT_FOUND


class InvalidRequestError(ServiceError):
    """The request is malformed (no words, wrong state shapes, ...)."""

    kind = ErrorKind.INVALID
    reason = Reason.INVALID_REQUEST


class MalformedRequestError(InvalidRequestError):
    """The request's bytes do not parse as the RPC's request message (random bytes, invalid UTF-8, ...)."""

    reason = Reason.MALFORMED_REQUEST


class UnauthenticatedError(ServiceError):
    """The call carries no valid credentials; the message never says which part was wrong."""

    kind = ErrorKind.UNAUTHENTICATED
    reason = Reason.UNAUTHENTICATED


WORD_SHOWN_CHARS = 40
"""How much of a bad word a message repeats: a 100,000-character word is named, not echoed."""


def shown_word(word: str) -> str:
    """The word as messages show it: repr() (control and invisible characters escaped), cut to
    WORD_SHOWN_CHARS characters with an ellipsis and its length said: 'hhhh…' (100000 characters)."""
    if len(word) <= WORD_SHOWN_CHARS:
        return repr(word)
    quoted = repr(word[:WORD_SHOWN_CHARS])
    return f"{quoted[:-1]}…{quoted[-1]} ({len(word)} characters)"


class InvalidWordError(InvalidRequestError):
    """One word cannot be encoded; the message names its index, the word and what is wrong."""

    def __init__(self, index: int, word: str, problem: str, reason: Reason, position: int | None = None) -> None:
        metadata = {"word_index": str(index)}
        if position is not None:
            metadata["position"] = str(position)
        super().__init__(f"word {index} {shown_word(word)}: {problem}", reason, metadata)
        self.index = index
        self.word = word
        self.problem = problem
        self.position = position


class RequestTooLargeError(ServiceError):
    """The request asks for more than the configured limits allow."""

    kind = ErrorKind.TOO_LARGE
    reason = Reason.TOO_MANY_WORDS


class OverloadedError(ServiceError):
    """The model's queue is full; the client should back off and retry."""

    kind = ErrorKind.OVERLOADED
    reason = Reason.QUEUE_FULL
    retry_after_s = 0.05


class TooManyBytesInFlightError(OverloadedError):
    """Requests being decoded or queued hold the server-wide byte budget; the client should back off and retry."""

    reason = Reason.REQUEST_BYTES_IN_FLIGHT


class ShuttingDownError(ServiceError):
    """The server is draining and takes no new work."""

    kind = ErrorKind.UNAVAILABLE
    reason = Reason.SHUTTING_DOWN
    retry_after_s = 0.1


class ModelsLoadingError(ServiceError):
    """The server has started but is still loading its models."""

    kind = ErrorKind.UNAVAILABLE
    reason = Reason.MODELS_LOADING
    retry_after_s = 0.5
