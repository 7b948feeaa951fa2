"""Start a server subprocess that reports its ports in a port file, wait until it has, stop it with SIGTERM.

charrnn-server (--port-file) and the echo service (clients.bench.echo) both write {"port": N, ...} once they
serve; the benchmark, the soak script and the tests start them through this one helper.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerProcess:
    """A server subprocess on 127.0.0.1 and the ports it chose."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int | None
    log_path: Path

    @property
    def target(self) -> str:
        """host:port to dial."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the server has written to stdout/stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit status (subprocess.TimeoutExpired if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop_or_kill(self, timeout: float = 30.0) -> None:
        """stop(), and SIGKILL if that does not end it in time."""
        try:
            self.stop(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def pinned(cpus: Collection[int] | None) -> Iterator[frozenset[int]]:
    """This thread, and the processes and threads it starts inside the block, on `cpus` (threads already running
    stay where they are); None: left as it is. Yields the affinity it replaced, restored on leaving."""
    own = frozenset(os.sched_getaffinity(0))
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    try:
        yield own
    finally:
        if cpus is not None:
            os.sched_setaffinity(0, own)


def spawn(
    name: str,
    command: Sequence[str],
    port_file: Path,
    log_path: Path,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    cpus: Collection[int] | None = None,
) -> ServerProcess:
    """Start `command` (which writes its ports to port_file once serving), output to log_path; wait for the file.
    `cpus`: the CPUs it may run on (its affinity, set before it starts, so that what it forks inherits it and
    what reads its usable cores, `--workers auto`, sees them); None: this process's.
    Raises RuntimeError if the process exits first, TimeoutError (after killing it) if it takes too long."""
    # The child inherits the affinity of the thread that forks it: this one's, pinned for the moment (no
    # preexec_fn, which is unsafe in a process with threads).
    with log_path.open("wb") as log, pinned(cpus):
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{name} did not start in {timeout} s:\n{log_path.read_text()}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    return ServerProcess(name, process, int(ports["port"]), ports.get("metrics_port"), log_path)
