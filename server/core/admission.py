"""Server-wide admission by size: a budget of request bytes being decoded or queued at once.

--max-message-bytes bounds one message; this bounds them all together, so that 64 concurrent 64 MiB messages
cannot mean 4 GiB of requests held in memory. Every front end of one server shares one ByteBudget: a handler
takes a request's size before decoding it and gives it back once the response is handed to gRPC.
"""

from __future__ import annotations

from server.core.errors import TooManyBytesInFlightError


class ByteBudget:
    """Bytes of requests in flight, capped; over the cap a request is refused (retryable) rather than queued."""

    __slots__ = ("limit", "in_use")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        """Bytes taken and not yet given back."""

    def take(self, size: int) -> None:
        """Count `size` bytes in, or raise TooManyBytesInFlightError (nothing taken) if they do not fit."""
        if self.in_use + size > self.limit:
            raise TooManyBytesInFlightError(
                f"requests of {self.in_use + size} bytes would be in flight, more than the server's limit of "
                f"{self.limit} (--max-inflight-bytes); retry shortly",
                metadata={"limit": str(self.limit)},
            )
        self.in_use += size

    def give(self, size: int) -> None:
        """Give back what take() counted."""
        self.in_use -= size
