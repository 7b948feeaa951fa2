"""How every client reaches a secured server: TLS or mTLS credentials and the bearer token, built in one place.

ClientSecurity is what the options say (--tls, --tls-ca, --tls-cert/--tls-key, --token-file or
$CHARRNN_TOKEN); channel() and aio_channel() open the channel they describe, so the library, charrnn,
charrnn-batch and charrnn-loadgen connect the same way. The token travels as `authorization: Bearer <token>`
on every call (a client interceptor, so raw method calls such as the load generator's carry it too); it is
never printed. tls_failure() turns gRPC's handshake errors into one line naming the likely cause.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "CHARRNN_TOKEN"


class ClientSecurityError(ValueError):
    """The client's TLS or token options cannot be used (a missing file, a key without a certificate)."""


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """TLS material and token of a client (plain bytes and strings: picklable for the load generator's processes)."""

    tls: bool = False
    """Connect with TLS (implied by ca)."""
    ca: bytes | None = None
    """PEM CA to trust instead of the system's store."""
    cert: bytes | None = None
    """PEM client certificate chain (mTLS), with key."""
    key: bytes | None = None
    token: str | None = None
    """The bearer token; repr() never shows it."""

    def __repr__(self) -> str:
        return (f"ClientSecurity(tls={self.tls}, ca={self.ca is not None}, client_cert={self.cert is not None}, "
                f"token={'set' if self.token else 'none'})")

    @classmethod
    def from_files(
        cls,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token_file: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientSecurity:
        """Read the files the options name; the token from token_file, else $CHARRNN_TOKEN."""
        if (tls_cert is None) != (tls_key is None):
            raise ClientSecurityError("--tls-cert and --tls-key go together: give both or neither")
        env = os.environ if environ is None else environ
        token = _read(token_file, "token file").decode("utf-8").strip() if token_file else env.get(TOKEN_ENV) or None
        if token is not None and (not token or any(ch.isspace() for ch in token) or not token.isprintable()):
            raise ClientSecurityError("the token must be one line of printable characters without spaces")
        return cls(
            tls=tls or tls_ca is not None or tls_cert is not None,
            ca=_pem_certificates(tls_ca, "CA file") if tls_ca else None,
            cert=_pem_certificates(tls_cert, "client certificate") if tls_cert else None,
            key=_read(tls_key, "client key") if tls_key else None,
            token=token,
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientSecurity:
        """From the options add_arguments() defined."""
        return cls.from_files(args.tls, args.tls_ca, args.tls_cert, args.tls_key, args.token_file)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel's TLS credentials, or None for plaintext."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel to target as these options describe."""
        credentials = self.credentials()
        if credentials is None:
            channel = grpc.insecure_channel(target, options=list(options))
        else:
            channel = grpc.secure_channel(target, credentials, options=list(options))
        if self.token:
            channel = grpc.intercept_channel(channel, _SyncToken(self._metadata()))
        return channel

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An asyncio channel to target as these options describe."""
        credentials = self.credentials()
        interceptors = _aio_token_interceptors(self._metadata()) if self.token else None
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
        return grpc.aio.secure_channel(target, credentials, options=list(options), interceptors=interceptors)


PLAINTEXT = ClientSecurity()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared options: --tls, --tls-ca, --tls-cert, --tls-key, --token-file."""
    group = parser.add_argument_group("security")
    group.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CA store")
    group.add_argument("--tls-ca", metavar="PEM", help="trust this CA (implies --tls)")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate for mTLS (with --tls-key; implies --tls)")
    group.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    group.add_argument("--token-file", metavar="FILE",
                       help=f"file holding the bearer token (default: ${TOKEN_ENV}, if set)")


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ClientSecurityError(f"cannot read the {what} {path}: {error.strerror or error}") from None


_CAUSES = (
    # (substring of gRPC's details, the likely cause), most specific first.
    ("Hostname Verification Check failed", "the server's certificate does not name the host dialled (hostname "
     "mismatch): dial a name the certificate was issued for"),
    ("not in peer certificate", "the server's certificate does not name the host dialled (hostname mismatch): "
     "dial a name the certificate was issued for"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not signed by the trusted CA (wrong --tls-ca?)"),
    ("CERTIFICATE_REQUIRED", "the server requires a client certificate (mTLS): give --tls-cert and --tls-key"),
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS (a plaintext server?): drop --tls/--tls-ca"),
    ("PACKET_LENGTH_TOO_LONG", "the server does not speak TLS (a plaintext server?): drop --tls/--tls-ca"),
    ("Ssl handshake failed", "the TLS handshake failed (wrong CA, a client certificate refused, or a plaintext "
     "server)"),
)


def definite_tls_failure(details: str) -> str | None:
    """The cause of a failure that is certainly a TLS misconfiguration (retrying cannot fix it), or None."""
    for needle, cause in _CAUSES:
        if needle in details:
            return f"TLS handshake failed: {cause}"
    return None


def tls_failure(details: str, tls: bool) -> str | None:
    """One line naming the likely cause of a connection failure that TLS explains, or None. A connection closed
    during the handshake is ambiguous (a server stopping looks the same), so it is named only as likely."""
    definite = definite_tls_failure(details)
    closed = "Socket closed" in details or "Connection reset" in details
    never_connected = "failed to connect" in details or "backends failing" in details
    if definite is not None or not (closed and never_connected):
        return definite
    if tls:
        return ("the server closed the connection during the TLS handshake: it likely requires a client "
                "certificate (mTLS: --tls-cert and --tls-key) or refused the one given")
    return "the server closed the connection: it likely serves TLS (connect with --tls or --tls-ca)"


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the authorization header to every call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self._metadata),
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: Any, metadata: Any, credentials: Any, wait_for_ready: Any,
                 compression: Any) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def _aio_token_interceptors(metadata: tuple[tuple[str, str], ...]) -> list[grpc.aio.ClientInterceptor]:
    def with_token(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        merged = grpc.aio.Metadata(*(details.metadata or ()), *metadata)
        return details._replace(metadata=merged)  # type: ignore[attr-defined]

    class Unary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(with_token(details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(with_token(details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
            return await continuation(with_token(details), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
            return await continuation(with_token(details), request_iterator)

    return [Unary(), UnaryStream(), StreamUnary(), StreamStream()]


def _pem_certificates(path: str | Path, what: str) -> bytes:
    """A file that must hold PEM certificates: checked here, since gRPC only logs its own errors for a bad one
    and then fails every call with "Failed to create security handshaker"."""
    data = _read(path, what)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ClientSecurityError(f"{what} {path}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)")
    return data
