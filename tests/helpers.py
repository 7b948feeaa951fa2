"""Helpers shared by the test modules: importable (`from tests.helpers import ...`), torch-free.

Fixtures live in conftest.py; plain functions and constants live here, so a test module never imports
conftest as a module, and the fast `unit` subset can use these without importing torch.
"""

from __future__ import annotations

import socket
import string
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.processes import ServerProcess, spawn
from clients.security import PLAINTEXT, ClientSecurity

if TYPE_CHECKING:
    import trustme

LARGE_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + "0123-"
"""57 letters: the alphabet of the checkpoint-imported LSTM(57, 64, num_layers=2)."""
assert len(LARGE_ALPHABET) == 57 and len(set(LARGE_ALPHABET)) == 57

LARGE_MODEL = "large_lstm"

CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
"""Raw test channels: receive what the server may send by default (gRPC's own default is 4 MiB)."""


def free_port() -> int:
    """A TCP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def console_script(name: str) -> str:
    """Path of one of the project's console scripts, installed beside this interpreter."""
    path = Path(sys.executable).with_name(name)
    assert path.exists(), f"{path} not found: install the project (pip install -e '.[test]')"
    return str(path)


def start_server(
    repository: Path, tmp_path: Path, *extra_args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
    security: ClientSecurity = PLAINTEXT,
) -> ServerProcess:
    """Start charrnn-server in a subprocess and wait until its health service reports SERVING (checked over
    `security`: TLS for a TLS server; health needs no token). One process (--workers 1) unless extra_args
    ask for more (tests/test_workers.py): most tests are about one server's behaviour, and two workers per
    test would double the suite's processes on a 2-core machine."""
    port_file = tmp_path / f"ports-{time.monotonic_ns()}.json"
    command = [
        console_script("charrnn-server"), "--repository", str(repository), "--address", "127.0.0.1",
        "--port", "0", "--metrics-port", "0", "--port-file", str(port_file), "--device", "cpu", "--workers", "1",
        *extra_args,
    ]
    server = spawn("charrnn-server", command, port_file, port_file.with_suffix(".log"), timeout, env)
    with security.channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    assert status.status == health_pb2.HealthCheckResponse.SERVING, status
    return server


class InProcessServer:
    """charrnn-server's own create_server() on an event loop in a thread: real gRPC over loopback, no subprocess.

    For unit tests over the torch-free repository of tests/onnx_models.py; `running` is server.main's
    RunningServer (its engine, metrics and health), `target` the address to dial.
    """

    def __init__(self, repository: Path, *flags: str) -> None:
        import asyncio
        import threading

        from server.config import parse_config
        from server.main import RunningServer, create_server

        self.config = parse_config(
            ["--repository", str(repository), "--address", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
             "--device", "cpu", *flags],
            {},
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="in-process-server", daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(create_server(self.config))
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coroutine: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Drain and stop the server, then its loop."""
        try:
            self.call(self.running.stop(grace_seconds))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def aio_error(status: grpc.Status) -> grpc.aio.AioRpcError:
    """The error a grpc.aio call raises when the server ends it with `status` (its trailer included)."""
    return grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details
    )


def transport_error(code: grpc.StatusCode, details: str = "from the transport") -> grpc.aio.AioRpcError:
    """An error with no google.rpc.Status in its trailer: gRPC's own (unreachable, reset stream, size limit)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def write_pair(folder: Path, cert: trustme.LeafCert, stem: str) -> tuple[Path, Path]:
    """A leaf certificate's chain and key as PEM files."""
    chain, key = folder / f"{stem}.pem", folder / f"{stem}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    return chain, key
