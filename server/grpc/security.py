"""TLS and mTLS on the gRPC port, with certificates rotated without a restart, and the file watcher.

ServerCertificates reads --tls-cert/--tls-key (and --tls-client-ca for mTLS), checks that they load and that
the key matches the certificate, and serves them through grpc's dynamic server credentials: grpc asks for the
configuration at every new TLS handshake, so after reload() new connections get the new certificate while
established ones keep theirs. reload() runs on SIGHUP and when a file changes (FileWatcher); files that do not
load leave the old certificate in force.

FileWatcher polls the files' (mtime, size, inode) every interval, following symlinks, so the atomic symlink
swap of a Kubernetes secret is seen as well as an in-place rewrite.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.grpc.auth import TokenAuthInterceptor, TokenFile
from server.metrics import Metrics

logger = logging.getLogger(__name__)


class CredentialsError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """Where the server's TLS material is: certificate chain and key (PEM), and the client CA for mTLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def paths(self) -> list[Path]:
        """Every file, for the watcher."""
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca is not None else [])


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CredentialsError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise CredentialsError(f"the {what} {path} is not PEM (no -----BEGIN line)")
    return data


def _check_pair(cert: bytes, key: bytes, files: CertificateFiles) -> None:
    """Load the pair with OpenSSL (via ssl) so a wrong key or a corrupt file is refused now, not at handshake."""
    with tempfile.TemporaryDirectory(prefix="charrnn-tls-") as folder:
        cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
        except ssl.SSLError as error:
            raise CredentialsError(
                f"the certificate {files.cert} and key {files.key} do not load as a pair: {error.reason or error}"
            ) from None


def _check_ca(ca: bytes, path: Path) -> None:
    try:
        ssl.create_default_context(cadata=ca.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as error:
        raise CredentialsError(f"the client CA {path} does not load: {error}") from None


def load_configuration(files: CertificateFiles) -> grpc.ServerCertificateConfiguration:
    """Read and check the files; a grpc certificate configuration, or CredentialsError naming the file."""
    cert = _read(files.cert, "certificate")
    key = _read(files.key, "private key")
    _check_pair(cert, key, files)
    ca = None
    if files.client_ca is not None:
        ca = _read(files.client_ca, "client CA")
        _check_ca(ca, files.client_ca)
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


class ServerCertificates:
    """The certificate the port serves; reload() makes new handshakes use the files' current contents."""

    def __init__(self, files: CertificateFiles) -> None:
        self.files = files
        self._lock = threading.Lock()  # grpc calls the fetcher from its own threads
        self._initial = load_configuration(files)
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for add_secure_port; client certificates required iff a client CA is set."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.files.client_ca is not None
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc before each handshake: None keeps what it has (rebuilding OpenSSL state costs).
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    async def reload(self) -> None:
        """Re-read the files (SIGHUP, or they changed); raise, keeping the old certificate, if they do not load."""
        configuration = await asyncio.get_running_loop().run_in_executor(None, load_configuration, self.files)
        with self._lock:
            self._pending = configuration
        logger.info("TLS certificate reloaded from %s (new connections use it)", self.files.cert)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class FileWatcher:
    """Runs a reload hook when one of its files changes, polling every `interval_s` seconds."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._watched: list[tuple[list[Path], Callable[[], Awaitable[None]]]] = []
        self._task: asyncio.Task[None] | None = None

    def watch(self, paths: Sequence[Path], hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` whenever any of `paths` changes."""
        self._watched.append((list(paths), hook))

    def start(self) -> None:
        """Start polling on the running loop (nothing to do without watched files)."""
        if self._watched and self._task is None:
            self._task = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _poll(self) -> None:
        seen = [[_signature(path) for path in paths] for paths, _ in self._watched]
        while True:
            await asyncio.sleep(self.interval_s)
            for index, (paths, hook) in enumerate(self._watched):
                now = [_signature(path) for path in paths]
                if now == seen[index]:
                    continue
                seen[index] = now
                try:
                    await hook()
                except Exception as error:  # e.g. the key written before the certificate: the next change retries
                    logger.warning("%s changed but could not be reloaded (keeping the old): %s",
                                   ", ".join(map(str, paths)), error)


class ServerSecurity:
    """What the port's security is made of (TLS certificates, bearer tokens), wired in by server.main:
    interceptors for grpc.aio.server(), add_port(), the reload hooks for SIGHUP, and the file watcher."""

    def __init__(
        self, certificates: ServerCertificates | None, tokens: TokenFile | None, metrics: Metrics
    ) -> None:
        self.certificates = certificates
        self.tokens = tokens
        self.interceptors: list[grpc.aio.ServerInterceptor] = (
            [TokenAuthInterceptor(tokens, metrics)] if tokens is not None else []
        )
        self.reload_hooks: list[Callable[[], Awaitable[None]]] = []
        if certificates is not None:
            self.reload_hooks.append(certificates.reload)
        if tokens is not None:
            self.reload_hooks.append(tokens.reload)

    @classmethod
    def load(
        cls, cert: Path | None, key: Path | None, client_ca: Path | None, token_file: Path | None, metrics: Metrics
    ) -> ServerSecurity:
        """Read every file now: a missing or unusable one is a start-up error (CredentialsError, TokenFileError)."""
        certificates = ServerCertificates(CertificateFiles(cert, key, client_ca)) if cert and key else None
        tokens = TokenFile(token_file) if token_file is not None else None
        return cls(certificates, tokens, metrics)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on `address`, with TLS if certificates were given; the bound port (0 if binding failed)."""
        if self.certificates is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.certificates.credentials())

    def watcher(self, interval_s: float) -> FileWatcher:
        """A FileWatcher (not started) running each reload hook when its files change."""
        watcher = FileWatcher(interval_s)
        if interval_s > 0:
            if self.certificates is not None:
                watcher.watch(self.certificates.files.paths, self.certificates.reload)
            if self.tokens is not None:
                watcher.watch([self.tokens.path], self.tokens.reload)
        return watcher

    def describe(self) -> str:
        """For the start-up line: TLS, mTLS or plaintext; tokens with the client count (never the tokens)."""
        transport = "plaintext" if self.certificates is None else (
            "mTLS" if self.certificates.files.client_ca is not None else "TLS"
        )
        auth = f"tokens ({len(self.tokens.names)} client(s))" if self.tokens is not None else "no tokens"
        return f"{transport}, {auth}"


def is_loopback(address: str) -> bool:
    """Whether a listen address is reachable only from this machine."""
    host = address.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
