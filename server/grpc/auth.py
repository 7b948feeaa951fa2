"""Bearer tokens, server-wide: a grpc.aio server interceptor in front of every service but grpc.health.v1.

The token file (--auth-token-file) holds one client per line, its name and its token separated by whitespace;
`#` starts a comment. Clients send `authorization: Bearer <token>`. A missing and a wrong token get the same
UNAUTHENTICATED status (reason UNAUTHENTICATED), and the message never repeats what was sent. Tokens are kept
only as SHA-256 digests of their header value, compared with hmac.compare_digest, and never logged or counted:
client *names* may be (charrnn_client_requests_total{client}).

The interceptor sits in front of every service of the grpc server (reflection and any other front end on the
same port included), so a new front end needs nothing here. TokenFile.reload() re-reads the file (SIGHUP and
file changes): a file that does not parse leaves the old tokens in force.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from server.core.errors import UnauthenticatedError
from server.grpc.status import rich_status
from server.metrics import Metrics

logger = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Method prefixes that need no token: probes and the compose healthcheck carry none."""

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token (send `authorization: Bearer <token>`)"

CLIENT_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("charrnn_client_name", default="")
"""The authenticated client's name while its RPC is handled ("" with tokens off): for logs and metrics."""


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file and line, never a token."""


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """name -> token from the token file's text (blank lines and `#` comments skipped)."""
    tokens: dict[str, str] = {}
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise TokenFileError(f"{source}, line {number}: expected `NAME TOKEN`, found {len(fields)} field(s)")
        name, token = fields
        if not name.isascii() or not name.isprintable() or len(name) > 64:
            raise TokenFileError(f"{source}, line {number}: a client name is up to 64 printable ASCII characters")
        if not token.isascii() or not token.isprintable():
            raise TokenFileError(f"{source}, line {number}: a token is printable ASCII (it goes in an HTTP header)")
        if name in tokens:
            raise TokenFileError(f"{source}, line {number}: client {name!r} appears twice")
        if token in seen:
            raise TokenFileError(f"{source}, line {number}: two clients share one token")
        tokens[name] = token
        seen.add(token)
    if not tokens:
        raise TokenFileError(f"{source}: no tokens (expected lines `NAME TOKEN`)")
    return tokens


def _digest(header_value: str) -> bytes:
    return hashlib.sha256(header_value.encode("utf-8", "surrogateescape")).digest()


class TokenFile:
    """The accepted tokens, read from a file; reload() swaps in a new file's tokens only if it parses."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._clients: tuple[tuple[bytes, str], ...] = ()
        self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise TokenFileError(f"cannot read the token file {self.path}: {error}") from None
        tokens = parse_tokens(text, str(self.path))
        # The expected header values, precomputed: a call costs one SHA-256 and one compare per client.
        self._clients = tuple((_digest(f"Bearer {token}"), name) for name, token in tokens.items())

    @property
    def names(self) -> list[str]:
        """The client names (never the tokens)."""
        return [name for _, name in self._clients]

    def client(self, authorization: str | None) -> str | None:
        """The name of the client whose token the header carries, or None. Constant time in the header's
        content: every client's digest is compared, with hmac.compare_digest."""
        if authorization is None:
            return None
        digest = _digest(authorization)
        found: str | None = None
        for expected, name in self._clients:
            if hmac.compare_digest(digest, expected):
                found = name
        return found

    async def reload(self) -> None:
        """Re-read the file (SIGHUP, or it changed); if it cannot be used, raise and keep the old tokens."""
        before = len(self._clients)
        self._load()
        logger.info("token file %s reloaded: %d client(s) (before: %d)", self.path, len(self._clients), before)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Let a call through only with a known bearer token (grpc.health.v1 is open); set CLIENT_NAME for it."""

    def __init__(self, tokens: TokenFile, metrics: Metrics) -> None:
        self.tokens = tokens
        self._metrics = metrics
        self._accepted: dict[str, Any] = {}
        self._denied = metrics.client_requests.labels("", "denied")
        status = rich_status(UnauthenticatedError(UNAUTHENTICATED_MESSAGE))
        self._deny_handlers = _deny_handlers(status)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():  # type: ignore[attr-defined]
            if key == "authorization":
                authorization = value if isinstance(value, str) else None
                break
        name = self.tokens.client(authorization)
        handler = await continuation(handler_call_details)
        if name is None:
            self._denied.inc()
            logger.debug("%s: %s", method, UNAUTHENTICATED_MESSAGE)
            if handler is None:  # an unknown method: still say UNAUTHENTICATED, not what exists
                return self._deny_handlers[(False, False)]
            return self._deny_handlers[(handler.request_streaming, handler.response_streaming)]
        counter = self._accepted.get(name)
        if counter is None:
            counter = self._accepted[name] = self._metrics.client_requests.labels(name, "accepted")
        counter.inc()
        CLIENT_NAME.set(name)  # the handler runs in this task's context
        return handler


def _deny_handlers(status: grpc.Status) -> dict[tuple[bool, bool], grpc.RpcMethodHandler]:
    """One handler per RPC shape that answers `status` without reading the request."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    async def streaming(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    return {
        (False, False): grpc.unary_unary_rpc_method_handler(unary),
        (False, True): grpc.unary_stream_rpc_method_handler(unary),
        (True, False): grpc.stream_unary_rpc_method_handler(streaming),
        (True, True): grpc.stream_stream_rpc_method_handler(streaming),
    }
