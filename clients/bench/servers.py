"""The processes a benchmark measures, and what is read from them from outside: memory, models, metrics.

Servers are started as users start them (`python -m server` with flags, waited for until the health service
says SERVING), the echo as `python -m clients.bench.echo`, both through clients.processes. Their resident
memory is sampled by psutil in a thread (RssSampler), their batch sizes read from their own /metrics.
"""

from __future__ import annotations

import sys
import threading
import urllib.request
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from clients.bench.plan import MIB
from clients.processes import ServerProcess, spawn
from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc


def start_server(
    name: str, repository: Path, folder: Path, device: str, batching: bool, extra: Sequence[str],
    cpus: Collection[int] | None = None,
) -> ServerProcess:
    """charrnn-server on a free port, waited for until its health service says SERVING. One process
    (--workers 1) unless `extra` says otherwise: the cells drive one connection per load-generator process, which
    reaches one worker, and memory is sampled from the process started. `cpus`: pinned to these (its workers
    too); None: wherever this process may run."""
    port_file = folder / f"{name}.ports.json"
    command = [
        sys.executable, "-m", "server", "--repository", str(repository), "--address", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--port-file", str(port_file), "--device", device, "--log-level", "WARNING",
        "--batching" if batching else "--no-batching", "--workers", "1", *extra,
    ]
    server = spawn(name, command, port_file, folder / f"{name}.log", timeout=120.0, cpus=cpus)
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=120)
    if status.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{name}: health says {status.status}")
    return server


def start_echo(
    folder: Path, model: Path | None = None, name: str = "echo", cpus: Collection[int] | None = None
) -> ServerProcess:
    """The echo service of clients.bench.echo (the transport baseline); with `model` (a version folder), the
    model floor: the echo plus one run of that model per request. `cpus`: pinned to these."""
    port_file = folder / f"{name}.ports.json"
    command = [sys.executable, "-m", "clients.bench.echo", "--port-file", str(port_file)]
    if model is not None:
        command += ["--run-model", str(model)]
    return spawn(name, command, port_file, folder / f"{name}.log", timeout=120.0, cpus=cpus)


def providers_of(server: ServerProcess) -> dict[str, str]:
    """Each model's execution provider, as the server reports it (the one actually running)."""
    with grpc.insecure_channel(server.target) as channel:
        models = pb_grpc.CharRnnStub(channel).ListModels(pb.ListModelsRequest(), timeout=30).models
    return {model.name: model.execution_provider for model in models}


class RssSampler:
    """Samples the resident set size of some processes every 50 ms in a thread; peaks can be read and reset."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._peaks = dict.fromkeys(pids, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            for name, process in self._processes.items():
                try:
                    rss = process.memory_info().rss
                except psutil.Error:
                    continue
                with self._lock:
                    self._peaks[name] = max(self._peaks[name], rss)

    def take_peak(self, name: str) -> int:
        """Peak RSS since the last call (bytes), then reset."""
        with self._lock:
            peak = self._peaks[name]
            self._peaks[name] = self._processes[name].memory_info().rss
        return max(peak, self._peaks[name])

    def close(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


def rss_mib(pid: int) -> float:
    """A process's resident set now, in MiB."""
    return psutil.Process(pid).memory_info().rss / MIB


def hwm_mib(pid: int) -> float | None:
    """The kernel's high-water mark of the resident set (VmHWM), if readable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def batch_words_totals(server: ServerProcess, model: str) -> tuple[float, float]:
    """(sum, count) of charrnn_batch_words for a model, from the server's /metrics."""
    if server.metrics_port is None:
        return 0.0, 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "charrnn_batch_words":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count


@contextmanager
def start_servers(
    repository: Path, folder: Path, device: str, extra: Sequence[str]
) -> Iterator[tuple[dict[bool, ServerProcess], ServerProcess]]:
    """charrnn-server with batching on and off (keyed True/False) and the echo; all stopped on leaving."""
    started: list[ServerProcess] = []
    try:
        servers = {}
        for batching in (True, False):
            server = start_server(f"server-batching-{'on' if batching else 'off'}", repository, folder, device,
                                  batching, extra)
            started.append(server)
            servers[batching] = server
        echo = start_echo(folder)
        started.append(echo)
        yield servers, echo
    finally:
        for process in started:
            process.stop_or_kill()
