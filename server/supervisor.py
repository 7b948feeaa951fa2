"""charrnn-server --workers N: N server processes on one port (SO_REUSEPORT) under this supervisor.

The supervisor loads no model and answers no RPC. It
- reserves the port (a bound, never listening SO_REUSEPORT socket: port 0 becomes one port every worker gets,
  and a restarted worker finds it still there), then starts N workers (`python -m server ... --worker-index I`),
  each a complete charrnn-server with its own sessions, batcher and health service;
- serves /metrics on the one metrics port: every worker's metrics summed (prometheus_client's multiprocess
  mode, a fresh PROMETHEUS_MULTIPROC_DIR per supervisor; server/metrics.py);
- writes --port-file once every worker serves (each worker reports to a port file of its own), and again with
  the new process ids after a restart;
- restarts a worker that dies, after a backoff that doubles with each quick death (logged);
- forwards SIGHUP (reload: RunningServer.reload in each worker) and SIGTERM/SIGINT (each worker drains within
  --grace-seconds), then exits 0 once every worker has stopped cleanly.
A worker that fails during start-up (bad repository, taken port) stops the others: exit 1, as a lone server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from server.config import ServerConfig
from server.metrics import MULTIPROCESS_DIR_VARIABLE, multiprocess_registry, serve_registry

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = 0.5
"""Delay before restarting a worker that died; doubled for each further death within STABLE_S of its start."""
MAX_RESTART_BACKOFF_S = 30.0
"""The longest restart delay."""
STABLE_S = 10.0
"""A worker that served this long before dying is restarted after RESTART_BACKOFF_S again."""
STOP_MARGIN_S = 5.0
"""Beyond --grace-seconds, how long a draining worker gets to exit before it is killed."""
_TICK_S = 0.05


@dataclass
class Worker:
    """One worker slot: its current process (None while waiting to restart) and its restart history."""

    index: int
    port_file: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    serving: bool = False
    quick_deaths: int = 0
    restart_at: float | None = None


class Supervisor:
    """Starts, watches, restarts and stops the workers of one charrnn-server (see the module docstring)."""

    def __init__(self, config: ServerConfig, argv: list[str]) -> None:
        self.config = config
        self.argv = argv
        self.scratch = Path(tempfile.mkdtemp(prefix="charrnn-supervisor-"))
        self.metrics_dir = self.scratch / "metrics"
        self.metrics_dir.mkdir()
        self.workers = [Worker(index, self.scratch / f"worker-{index}.json") for index in range(config.workers)]
        self.port = config.port
        self.metrics_port: int | None = None
        self._signals: list[int] = []
        self._reservation: socket.socket | None = None

    # ---- the loop -----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status (0: every worker stopped cleanly)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda signum, _frame: self._signals.append(signum))
        try:
            self._reserve_port()
            if self.config.metrics_port >= 0:
                address = self.config.metrics_address or self.config.address
                try:
                    self.metrics_port = serve_registry(
                        multiprocess_registry(str(self.metrics_dir)), self.config.metrics_port, address
                    )
                except OSError as error:
                    raise OSError(f"cannot serve metrics on {address}:{self.config.metrics_port}: {error}") from error
            for worker in self.workers:
                self._start(worker)
            if not self._wait_until_serving():
                return self._stop()
            logger.info("supervisor: %d workers serving on %s:%d (pids %s; metrics %s)", len(self.workers),
                        self.config.address, self.port, ", ".join(str(w.process.pid) for w in self.workers if w.process),
                        f"port {self.metrics_port}" if self.metrics_port is not None else "off")
            self._write_port_file()
            while True:
                if self._handle_signals():
                    return self._stop()
                self._watch()
                time.sleep(_TICK_S)
        except OSError as error:
            logger.error("cannot start: %s", error)
            print(f"charrnn-server: cannot start: {error}", file=sys.stderr)
            self._kill_all()
            return 1
        finally:
            if self._reservation is not None:
                self._reservation.close()
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _wait_until_serving(self) -> bool:
        """True once every worker serves; False on a stop signal. Raises OSError if a worker fails to start."""
        while not all(worker.serving for worker in self.workers):
            if self._handle_signals():
                return False
            for worker in self.workers:
                assert worker.process is not None
                code = worker.process.poll()
                if code is not None:
                    raise OSError(f"worker {worker.index} (pid {worker.process.pid}) exited with {code} during start-up")
                worker.serving = worker.serving or _has_content(worker.port_file)
            time.sleep(_TICK_S)
        return True

    def _handle_signals(self) -> bool:
        """Forward what arrived; True if it was a stop signal."""
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                logger.info("supervisor: SIGHUP, forwarded to %d workers", self._signal_all(signal.SIGHUP))
            else:
                return True
        return False

    def _watch(self) -> None:
        """Notice deaths (schedule a restart with backoff), restart those due, note restarted ones serving."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is not None:
                code, pid = worker.process.returncode, worker.process.pid
                lived = now - worker.started_at
                worker.quick_deaths = worker.quick_deaths + 1 if lived < STABLE_S else 0
                delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2 ** max(0, worker.quick_deaths - 1))
                logger.warning("supervisor: worker %d (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                               worker.index, pid, code, lived, delay)
                mark_process_dead(pid, str(self.metrics_dir))  # its live gauges go; its counts stay in the sums
                worker.process, worker.serving, worker.restart_at = None, False, now + delay
            elif worker.process is None and worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker)
            elif worker.process is not None and not worker.serving and _has_content(worker.port_file):
                worker.serving = True
                logger.info("supervisor: worker %d (pid %d) serving again", worker.index, worker.process.pid)
                self._write_port_file()

    def _stop(self) -> int:
        """Forward SIGTERM, wait for every worker to drain (killing one that overruns); 0 if all exited 0."""
        logger.info("supervisor: stopping %d workers (grace %.1f s)", self._signal_all(signal.SIGTERM),
                    self.config.grace_seconds)
        deadline = time.monotonic() + self.config.grace_seconds + STOP_MARGIN_S
        clean = True
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                code = worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("supervisor: worker %d (pid %d) did not stop in time; killed",
                             worker.index, worker.process.pid)
                worker.process.kill()
                code = worker.process.wait()
            if code != 0 and not (code == -signal.SIGTERM and not worker.serving):  # killed before it could drain
                clean = False
                logger.error("supervisor: worker %d (pid %d) exited with %s", worker.index, worker.process.pid, code)
        logger.info("supervisor: stopped")
        return 0 if clean else 1

    # ---- helpers ------------------------------------------------------------------------------------------

    def _reserve_port(self) -> None:
        family = socket.AF_INET6 if ":" in self.config.address else socket.AF_INET
        reservation = socket.socket(family, socket.SOCK_STREAM)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            reservation.bind((self.config.address.strip("[]"), self.config.port))
        except OSError as error:
            reservation.close()
            raise OSError(f"cannot listen on {self.config.address}:{self.config.port}: {error}") from error
        self._reservation = reservation
        self.port = int(reservation.getsockname()[1])

    def _start(self, worker: Worker) -> None:
        worker.port_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "server", *self.argv, "--workers", "1", "--worker-index", str(worker.index),
            "--port", str(self.port), "--metrics-port", "-1", "--port-file", str(worker.port_file),
        ]
        environment = {**os.environ, MULTIPROCESS_DIR_VARIABLE: str(self.metrics_dir)}
        worker.process = subprocess.Popen(command, env=environment)  # output: the supervisor's own
        worker.started_at, worker.serving, worker.restart_at = time.monotonic(), False, None
        logger.info("supervisor: started worker %d (pid %d)", worker.index, worker.process.pid)

    def _signal_all(self, signum: int) -> int:
        sent = 0
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)
                sent += 1
        return sent

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()

    def _write_port_file(self) -> None:
        """The ports (as a lone server writes them) and the workers' process ids, replaced atomically."""
        if self.config.port_file is None:
            return
        content = {
            "port": self.port, "metrics_port": self.metrics_port,
            "workers": [worker.process.pid if worker.process is not None else None for worker in self.workers],
        }
        partial = self.config.port_file.with_name(self.config.port_file.name + ".partial")
        partial.write_text(json.dumps(content))
        partial.replace(self.config.port_file)


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def supervise(config: ServerConfig, argv: list[str]) -> int:
    """Run `config.workers` workers of the server that argv describes; the exit status."""
    return Supervisor(config, argv).run()
