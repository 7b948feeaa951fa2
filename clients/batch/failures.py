"""How a batch job fails: FatalError ends it, RetryableError re-sends the chunks of the stream that failed.

classify() decides which a failed RPC is, from the status details the server attaches (clients.errors, the
one predicate the library, the CLI and this job share), never from the message text: QUEUE_FULL, MODELS_LOADING
and SHUTTING_DOWN are retried, and so is a transport failure (a killed server, a reset stream), which comes
without our ErrorInfo. Backoff paces the retries; a server's RetryInfo delay, when it sent one, is a floor.
"""

from __future__ import annotations

import random

import grpc

from clients.errors import error_details, is_rpc_retryable

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0


class FatalError(Exception):
    """The job cannot go on; the message says why."""


class RetryableError(Exception):
    """A stream failed in a way worth retrying (server down, restarting or draining, queue full, stream broken,
    no answer); `retry_after_s` is the server's RetryInfo delay, if it sent one."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def classify(error: grpc.RpcError, target: str) -> FatalError | RetryableError:
    """What a failed RPC means for the job: retried if clients.errors says it may succeed later, else fatal."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message = f"{target}: {code.name}: {error.details() or ''}"  # type: ignore[attr-defined]
    if is_rpc_retryable(error):
        return RetryableError(message, error_details(error).retry_after_s)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # too many words, or a message over a size limit
        message += " (lower --chunk-size?)"
    return FatalError(message)


class Backoff:
    """Exponential backoff with jitter: 0.1 s, 0.2 s, ... up to a cap."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.delay = BACKOFF_INITIAL_S

    def next(self, floor_s: float | None = None) -> float:
        """The next delay, in seconds; never under floor_s (a server's RetryInfo delay)."""
        delay = min(self.delay, self.cap)
        self.delay = min(self.delay * 2, self.cap)
        return max(delay * random.uniform(0.5, 1.0), floor_s or 0.0)

    def reset(self) -> None:
        """Start again from the shortest delay."""
        self.delay = BACKOFF_INITIAL_S
