"""The performance benchmark: one run, one machine, every number in docs/performance.md.

    python -m clients.benchmark [--quick] [--out docs/performance.md] [--device auto|cpu|cuda]

In one run it measures
1. the in-process limit: ModelRuntime.run (our one-hot encoding + onnxruntime session.run, no gRPC) for
   batches of 1, 32 and 1024 words;
2. the transport limit: a trivial grpc.aio echo service (generic handler, raw bytes, in a subprocess) driven
   by the same load generator at the same concurrency, answering payloads of the size of real responses;
3. charrnn-server (a subprocess, as users start it) at concurrency 1, 8, 64 x 1, 32, 1024 words per
   request, unary and streaming, with batching on and off, on the built-in LSTM;
4. the same for a larger LSTM exported from a checkpoint (alphabet of 57 letters, hidden 256, 2 layers);
5. the server's resident memory at idle and its peak under load (psutil, sampled every 50 ms);
and, to explain the ratios, our Encode handler without gRPC (its CPU and time per request), the CPU per
request of every server and of the load generator, and the batching knobs side by side (tuning). It then
writes a markdown report: machine, versions, the execution provider actually used, every table, the ratios
against the targets and the best ratio this machine allows for each. The report is regenerated, never
edited by hand.

Needs the test extras (torch to export the models, psutil). --device and --server-arg are passed to the
servers, so the same command runs on a GPU machine with --device cuda.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import resource
import shlex
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.loadgen import LoadConfig, LoadResult, build_request_pool, fetch_alphabet, run_load
from clients.processes import ServerProcess, spawn
from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

MAIN_MODEL = "lstm"
LARGE_MODEL = "large_lstm"
LARGE_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + "0123-"  # 57 letters
LARGE_HIDDEN = 256
LARGE_LAYERS = 2
WORD_LENGTH = 8
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures, and for how long."""

    duration_s: float
    warmup_s: float
    inprocess_s: float
    batches: tuple[int, ...]
    main_cells: tuple[tuple[int, int], ...]
    """(concurrency, words per request) for the main model."""
    large_cells: tuple[tuple[int, int], ...]
    stream: bool = True
    long_duration_s: float = 0.0
    """Duration for cells whose requests take long (1024 words on the large model)."""
    target_repeats: int = 1
    """Times each pair of cells a target compares is measured (the targets take the median ratio)."""


FULL = Plan(
    duration_s=3.0,
    warmup_s=0.7,
    inprocess_s=1.0,
    batches=(1, 32, 1024),
    main_cells=tuple((c, w) for w in (1, 32, 1024) for c in (1, 8, 64)),
    large_cells=((1, 1), (8, 1), (64, 1), (1, 32), (8, 32), (64, 32), (1, 1024), (8, 1024)),
    long_duration_s=6.0,
    target_repeats=3,
)
QUICK = Plan(
    duration_s=0.8,
    warmup_s=0.3,
    inprocess_s=0.3,
    batches=(1, 32, 1024),
    main_cells=((1, 1), (64, 1), (64, 32), (8, 1024)),
    large_cells=((64, 1),),
    long_duration_s=2.0,
)


@dataclass(slots=True)
class Cell:
    """One load measurement."""

    target: str  # "echo", "server"
    model: str
    rpc: str  # "unary", "stream"
    batching: bool | None
    concurrency: int
    words: int
    result: dict[str, Any]
    avg_batch_words: float | None = None
    peak_rss_mib: float | None = None
    server_cpu_us: float | None = None
    """CPU time of the serving process (all its threads) per request sent, warm-up included."""
    client_cpu_us: float | None = None
    """CPU time of the load generator per request sent (this process and its load processes)."""
    repeat: int = 0
    """0 for the main tables; 1, 2... for the repeated measurements of the targets' cells."""


@dataclass(slots=True)
class Report:
    """Everything the markdown is written from (also dumped as JSON with --json)."""

    command: str
    started_utc: str
    machine: dict[str, Any]
    plan: dict[str, Any]
    server_flags: list[str]
    providers: dict[str, str] = field(default_factory=dict)
    inprocess: list[dict[str, Any]] = field(default_factory=list)
    handler: list[dict[str, Any]] = field(default_factory=list)
    tuning: list[dict[str, Any]] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    elapsed_s: float = 0.0


def log(message: str) -> None:
    """Progress, to stderr."""
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict[str, Any]:
    """nproc, CPU model, memory, versions; GPU name when nvidia-smi answers."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if device != "cpu":
        try:
            gpu = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu = ""
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "gpu": gpu or "none",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers_available": onnxruntime.get_available_providers(),
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------------- models


def export_repository(folder: Path) -> Path:
    """The built-in models and the large checkpoint LSTM, exported as charrnn-export would."""
    import torch  # the export extras; imported here so --help works without them

    from export.models import BUILTIN_SPECS, load_checkpoint, seeded_model
    from export.repository import export_model

    repository = folder / "model_repository"
    for spec in BUILTIN_SPECS.values():
        export_model(seeded_model(spec), repository)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(2024)
    module = torch.nn.LSTM(input_size=len(LARGE_ALPHABET), hidden_size=LARGE_HIDDEN, num_layers=LARGE_LAYERS)
    torch.random.set_rng_state(generator_state)
    checkpoint = folder / f"{LARGE_MODEL}.pt"
    torch.save(module.state_dict(), checkpoint)
    export_model(load_checkpoint(checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET), repository)
    return repository


def measure_inprocess(repository: Path, device: str, run_threads: int, plan: Plan) -> list[dict[str, Any]]:
    """words/s of our one-hot encoding + an onnxruntime run for each batch size, one batch after another, run
    the way the server runs them (ModelRuntime.start_run: session.run_async on the session's run threads)."""
    from server.alphabet import EncodedWords
    from server.runtime import BatchOutputs, ModelRuntime

    def run(
        model: ModelRuntime, encoded: EncodedWords, h0: np.ndarray, c0: np.ndarray | None  # type: ignore[type-arg]
    ) -> None:
        finished = threading.Event()
        failures: list[BaseException] = []

        def done(outputs: BatchOutputs | None, error: BaseException | None) -> None:
            if error is not None:
                failures.append(error)
            finished.set()

        model.start_run(encoded, h0, c0, done)
        finished.wait()
        if failures:
            raise failures[0]

    rows = []
    for name in (MAIN_MODEL, LARGE_MODEL):
        model = ModelRuntime(repository / name, device, run_threads)
        rng = np.random.default_rng(0)
        letters = np.array(list(model.manifest.alphabet))
        for batch in plan.batches:
            words = ["".join(row) for row in letters[rng.integers(0, len(letters), size=(batch, WORD_LENGTH))]]
            encoded = model.alphabet.encode(words)
            h0 = model.zero_state(batch)
            c0 = np.zeros_like(h0) if model.manifest.has_cell_state else None
            run(model, encoded, h0, c0)  # warm-up
            runs, started = 0, time.perf_counter()
            while True:
                run(model, encoded, h0, c0)
                runs += 1
                elapsed = time.perf_counter() - started
                if elapsed >= plan.inprocess_s and runs >= 3:
                    break
            rows.append({
                "model": name, "provider": model.provider, "batch_words": batch, "runs": runs,
                "ms_per_run": elapsed / runs * 1000, "words_per_s": batch * runs / elapsed,
            })
            log(f"in-process {name} batch {batch}: {batch * runs / elapsed:,.0f} words/s")
    return rows


HANDLER_SHAPES = ((1, 1), (64, 1), (64, 32))
"""(concurrency, words per request) at which the handler is measured without gRPC (the transport targets)."""


class _NoGrpcContext:
    """What CharRnnService's Encode reads from a grpc.aio context, for calling it without gRPC."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


def measure_handler(
    repository: Path, device: str, server_flags: Sequence[str], plan: Plan
) -> list[dict[str, Any]]:
    """Our whole Encode handler without gRPC: request checks, one-hot, batcher, hand-off to onnxruntime's thread,
    response bytes, metrics - called directly by `concurrency` coroutines, configured as charrnn-server is by
    the same flags. What it costs per request (CPU of this process, all threads) is what the server adds to
    a gRPC call."""
    from server.batcher import BatchSettings
    from server.config import parse_config
    from server.engine import Engine, Limits
    from server.metrics import Metrics
    from server.runtime import ModelRuntime
    from server.service import CharRnnService

    config = parse_config(list(server_flags), {})
    model = ModelRuntime(repository / MAIN_MODEL, device, config.run_threads)
    letters = model.manifest.alphabet

    async def measure(concurrency: int, words: int) -> dict[str, Any]:
        metrics = Metrics()
        settings = BatchSettings(config.max_batch_words, config.max_queue_delay_ms / 1000.0, config.max_queue_words)
        engine = Engine({model.name: model}, Limits(config.max_words, config.max_word_length),
                        settings if config.batching else None, config.run_threads, metrics.observe_run)
        engine.start()
        service = CharRnnService(metrics)
        service.attach(engine)
        rng = np.random.default_rng(0)
        requests = [
            pb.EncodeRequest(model=model.name, words=["".join(row) for row in
                                                      np.array(list(letters))[rng.integers(0, len(letters), (words, WORD_LENGTH))]])
            for _ in range(64)
        ]
        context = _NoGrpcContext()
        done = 0

        async def caller(index: int, until: float) -> None:
            nonlocal done
            while time.perf_counter() < until:
                await service.Encode(requests[index % len(requests)], context)  # type: ignore[arg-type]
                index += 1
                done += 1

        await asyncio.gather(*(caller(i, time.perf_counter() + plan.warmup_s) for i in range(concurrency)))
        done = 0
        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller(i, started + plan.inprocess_s * 2) for i in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        await engine.close()
        done = max(done, 1)
        return {
            "model": model.name, "concurrency": concurrency, "words": words, "requests": done,
            "requests_per_s": done / elapsed, "wall_us_per_request": elapsed / done * 1e6 * concurrency,
            "cpu_us_per_request": cpu / done * 1e6,
        }

    rows = []
    for concurrency, words in HANDLER_SHAPES:
        row = asyncio.run(measure(concurrency, words))
        rows.append(row)
        log(f"handler without gRPC c{concurrency} w{words}: {row['cpu_us_per_request']:.0f} us CPU/request, "
            f"{row['wall_us_per_request']:.0f} us per request")
    return rows


# ------------------------------------------------------------------------------------------------ processes


def start_server(
    name: str, repository: Path, folder: Path, device: str, batching: bool, extra: Sequence[str]
) -> ServerProcess:
    """charrnn-server on a free port, waited for until its health service says SERVING."""
    port_file = folder / f"{name}.ports.json"
    command = [
        sys.executable, "-m", "server", "--repository", str(repository), "--address", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--port-file", str(port_file), "--device", device, "--log-level", "WARNING",
        "--batching" if batching else "--no-batching", *extra,
    ]
    server = spawn(name, command, port_file, folder / f"{name}.log", timeout=120.0)
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=120)
    if status.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{name}: health says {status.status}")
    return server


def start_echo(folder: Path) -> ServerProcess:
    """The echo service of charrnn-loadgen --serve-echo."""
    port_file = folder / "echo.ports.json"
    command = [sys.executable, "-m", "clients.loadgen", "--serve-echo", "--port-file", str(port_file)]
    return spawn("echo", command, port_file, folder / "echo.log", timeout=120.0)


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
        self._stop.set()
        self._thread.join()


def rss_mib(pid: int) -> float:
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
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

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


# ----------------------------------------------------------------------------------------------------- load


def _process_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _client_cpu_s() -> float:
    """CPU of this process (the load generator runs here) and of its finished load processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def _cpu_per_request(pid: int) -> Iterator[Callable[[LoadResult], tuple[float | None, float | None]]]:
    """Server and client CPU microseconds per request sent: call the yielded function with the load's result
    as soon as the load is done (inside the block); the CPU readings are taken at that first call."""
    server, client = _process_cpu_s(pid), _client_cpu_s()
    ends: list[float] = []

    def per_request(result: LoadResult) -> tuple[float | None, float | None]:
        if not ends:
            ends.extend((_process_cpu_s(pid), _client_cpu_s()))
        if not result.issued:
            return None, None
        return (ends[0] - server) / result.issued * 1e6, (ends[1] - client) / result.issued * 1e6

    yield per_request


def _load(target: str, model: str, concurrency: int, words: int, plan: Plan, stream: bool, processes: int,
          echo_bytes: int | None = None, duration_s: float | None = None) -> LoadResult:
    return run_load(
        LoadConfig(
            target=target, model=model, concurrency=concurrency, words_per_request=words, word_length=WORD_LENGTH,
            duration_s=duration_s or plan.duration_s, warmup_s=plan.warmup_s, stream=stream, processes=processes,
            echo=echo_bytes is not None, echo_response_bytes=echo_bytes or 0,
        )
    )


def response_bytes(server: ServerProcess, model: str, words: int) -> int:
    """Size of the server's response to the load generator's first request of that shape."""
    request = build_request_pool(model, fetch_alphabet(server.target, model), words, WORD_LENGTH)[0]
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 256 * MIB)]) as channel:
        data: bytes = channel.unary_unary("/charrnn.v1.CharRnn/Encode")(request, timeout=120)
    return len(data)


def run_cells(
    report: Report, plan: Plan, servers: dict[bool, ServerProcess], echo: ServerProcess, sampler: RssSampler,
    processes: int,
) -> None:
    """Every load cell, interleaved per shape (server batching on, off, then echo) so they share conditions."""
    shapes: list[tuple[str, int, int]] = [(MAIN_MODEL, c, w) for c, w in plan.main_cells]
    shapes += [(LARGE_MODEL, c, w) for c, w in plan.large_cells]
    rpcs = ("unary", "stream") if plan.stream else ("unary",)
    for model, concurrency, words in shapes:
        for rpc in rpcs:
            for batching in (True, False):
                report.cells.append(_server_cell(servers, batching, model, rpc, concurrency, words, plan, processes,
                                                 sampler))
            if model == MAIN_MODEL:
                report.cells.append(_echo_cell(echo, servers[True], rpc, concurrency, words, plan, processes))


TARGET_PAIRS = (
    ("server", MAIN_MODEL, 1, 1), ("server", MAIN_MODEL, 64, 1), ("server", MAIN_MODEL, 64, 32),
    ("batching", LARGE_MODEL, 64, 1),
)
"""The cells each target compares: our server (batching on) against the echo, or batching on against off."""


def run_target_repeats(
    report: Report, plan: Plan, servers: dict[bool, ServerProcess], echo: ServerProcess, sampler: RssSampler,
    processes: int,
) -> None:
    """Measure the targets' pairs of cells again, plan.target_repeats - 1 times, alternating which side goes first."""
    for repeat in range(1, plan.target_repeats):
        for against, model, concurrency, words in TARGET_PAIRS:
            for side in (0, 1) if repeat % 2 == 0 else (1, 0):
                if side == 0:
                    cell = _server_cell(servers, True, model, "unary", concurrency, words, plan, processes, sampler,
                                        repeat)
                elif against == "batching":
                    cell = _server_cell(servers, False, model, "unary", concurrency, words, plan, processes, sampler,
                                        repeat)
                else:
                    cell = _echo_cell(echo, servers[True], "unary", concurrency, words, plan, processes, repeat)
                report.cells.append(cell)


def _server_cell(
    servers: dict[bool, ServerProcess], batching: bool, model: str, rpc: str, concurrency: int, words: int, plan: Plan,
    processes: int, sampler: RssSampler, repeat: int = 0,
) -> Cell:
    server = servers[batching]
    duration = plan.long_duration_s if model == LARGE_MODEL and words >= 1024 else plan.duration_s
    before = batch_words_totals(server, model)
    sampler.take_peak(server.name)
    with _cpu_per_request(server.process.pid) as cpu:
        result = _load(server.target, model, concurrency, words, plan, rpc == "stream", processes, duration_s=duration)
        server_cpu, client_cpu = cpu(result)
    after = batch_words_totals(server, model)
    runs = after[1] - before[1]
    log(f"{model} {rpc} batching={'on' if batching else 'off'} c{concurrency} w{words}"
        f"{f' (repeat {repeat})' if repeat else ''}: {result.requests_per_s:,.0f} req/s, "
        f"{result.words_per_s:,.0f} words/s, p50 {result.latency_ms['p50']:.2f} ms, errors {result.errors or 'none'}")
    return Cell(
        "server", model, rpc, batching, concurrency, words, result.to_json(),
        avg_batch_words=(after[0] - before[0]) / runs if runs else None,
        peak_rss_mib=sampler.take_peak(server.name) / MIB,
        server_cpu_us=server_cpu, client_cpu_us=client_cpu, repeat=repeat,
    )


def _echo_cell(
    echo: ServerProcess, server: ServerProcess, rpc: str, concurrency: int, words: int, plan: Plan, processes: int,
    repeat: int = 0,
) -> Cell:
    payload = response_bytes(server, MAIN_MODEL, words)
    with _cpu_per_request(echo.process.pid) as cpu:
        result = _load(echo.target, MAIN_MODEL, concurrency, words, plan, rpc == "stream", processes,
                       echo_bytes=payload)
        server_cpu, client_cpu = cpu(result)
    log(f"echo {rpc} c{concurrency} w{words} ({payload} B){f' (repeat {repeat})' if repeat else ''}: "
        f"{result.requests_per_s:,.0f} req/s, p50 {result.latency_ms['p50']:.2f} ms")
    return Cell("echo", MAIN_MODEL, rpc, None, concurrency, words, result.to_json(),
                server_cpu_us=server_cpu, client_cpu_us=client_cpu, repeat=repeat)


TUNING_VARIANTS = (
    ("--max-queue-delay-ms", "0", "--run-threads", "1"),
    ("--max-queue-delay-ms", "5", "--run-threads", "1"),
    ("--max-queue-delay-ms", "5", "--run-threads", "2"),
)
TUNING_CELLS = (
    (MAIN_MODEL, 8, 1), (MAIN_MODEL, 64, 1), (MAIN_MODEL, 64, 32), (LARGE_MODEL, 64, 1), (LARGE_MODEL, 8, 1024),
)


def run_tuning(
    report: Report, plan: Plan, repository: Path, folder: Path, device: str, processes: int, extra: Sequence[str]
) -> None:
    """The two batching knobs side by side: a server per setting (after any --server-arg), the same unary cells."""
    for index, flags in enumerate(TUNING_VARIANTS):
        server = start_server(f"tuning-{index}", repository, folder, device, True, [*extra, *flags])
        try:
            for model, concurrency, words in TUNING_CELLS:
                before = batch_words_totals(server, model)
                long = model == LARGE_MODEL and words >= 1024
                result = _load(server.target, model, concurrency, words, plan, False, processes,
                               duration_s=plan.long_duration_s if long else None)
                after = batch_words_totals(server, model)
                runs = after[1] - before[1]
                report.tuning.append({
                    "flags": " ".join(flags), "model": model, "concurrency": concurrency, "words": words,
                    "requests_per_s": result.requests_per_s, "words_per_s": result.words_per_s,
                    "p50_ms": result.latency_ms["p50"], "avg_batch_words": (after[0] - before[0]) / runs if runs else None,
                })
                log(f"tuning {' '.join(flags)}: {model} c{concurrency} w{words}: {result.words_per_s:,.0f} words/s, "
                    f"p50 {result.latency_ms['p50']:.2f} ms")
        finally:
            server.stop_or_kill()


# --------------------------------------------------------------------------------------------------- report


def _find(report: Report, **match: Any) -> Cell | None:
    for cell in report.cells:
        if all(getattr(cell, key) == value for key, value in match.items()):
            return cell
    return None


def _inprocess(report: Report, model: str, batch: int) -> float | None:
    for row in report.inprocess:
        if row["model"] == model and row["batch_words"] == batch:
            return float(row["words_per_s"])
    return None


@dataclass(frozen=True, slots=True)
class Check:
    """One target: what was compared, the ratio, the goal."""

    name: str
    detail: str
    ratio: float | None
    goal: str
    passed: bool | None
    bound: float | None = None
    """The best ratio this machine allows, from this run's own figures (see CEILINGS), where one applies."""
    bound_detail: str = ""


def evaluate(report: Report) -> list[Check]:
    """The targets, as ratios from this run."""
    checks: list[Check] = []
    on = {"target": "server", "model": MAIN_MODEL, "batching": True, "rpc": "unary"}

    def add(name: str, detail: str, ratio: float | None, goal: str, ok: Any,
            bound: tuple[float, str] | None = None) -> None:
        valid = ratio is not None and math.isfinite(ratio)
        checks.append(Check(name, detail, ratio if valid else None, goal, bool(ok(ratio)) if valid else None,
                            *(bound or (None, ""))))

    cores = int(report.machine.get("affinity") or os.cpu_count() or 1)

    def echo_of(concurrency: int, words: int) -> dict[str, Any]:
        return {"target": "echo", "rpc": "unary", "concurrency": concurrency, "words": words}

    pairs = _pairs(report, {**on, "concurrency": 1, "words": 1}, echo_of(1, 1))
    if pairs:
        (server, echo), ratio, ratios = _median(pairs, lambda a, b: a.result["latency_ms"]["p50"] / b.result["latency_ms"]["p50"])
        s, e = server.result["latency_ms"]["p50"], echo.result["latency_ms"]["p50"]
        add("1 word, concurrency 1: latency", f"server p50 {s:.3f} ms / echo p50 {e:.3f} ms{_spread(ratios)}", ratio,
            "<= 1.5", lambda r: r <= 1.5, _latency_floor(report, e))
    pairs = _pairs(report, {**on, "concurrency": 64, "words": 1}, echo_of(64, 1))
    if pairs:
        (server, echo), ratio, ratios = _median(pairs, lambda a, b: a.result["words_per_s"] / b.result["requests_per_s"])
        s, e = server.result["words_per_s"], echo.result["requests_per_s"]
        add("1 word, concurrency 64: throughput", f"server {s:,.0f} words/s / echo {e:,.0f} req/s{_spread(ratios)}",
            ratio, ">= 0.9", lambda r: r >= 0.9, _cpu_ceiling(report, pairs[0][1], 64, 1, cores))
    pairs = _pairs(report, {**on, "concurrency": 64, "words": 32}, echo_of(64, 32))
    if pairs:
        (server, echo), ratio, ratios = _median(pairs, lambda a, b: a.result["words_per_s"] / b.result["words_per_s"])
        s, e = server.result["words_per_s"], echo.result["words_per_s"]
        add("32 words, concurrency 64: throughput", f"server {s:,.0f} words/s / echo {e:,.0f} words/s "
            f"({echo.result['response_bytes']:,} B responses){_spread(ratios)}", ratio, ">= 0.8", lambda r: r >= 0.8,
            _cpu_ceiling(report, pairs[0][1], 64, 32, cores))
    limit = _inprocess(report, MAIN_MODEL, 1024)
    candidates = [
        cell for cell in report.cells
        if cell.target == "server" and cell.model == MAIN_MODEL and cell.batching and cell.concurrency == 8
        and cell.words == 1024
    ]
    if candidates and limit:
        best = max(candidates, key=lambda cell: cell.result["words_per_s"])
        s = best.result["words_per_s"]
        add("1024 words, concurrency 8: vs in-process", f"server ({best.rpc}) {s:,.0f} words/s / in-process batch "
            f"1024 {limit:,.0f} words/s", s / limit, ">= 0.6", lambda r: r >= 0.6)
    large = {"target": "server", "model": LARGE_MODEL, "rpc": "unary", "concurrency": 64, "words": 1}
    pairs = _pairs(report, {**large, "batching": True}, {**large, "batching": False})
    if pairs:
        (large_on, large_off), ratio, ratios = _median(
            pairs, lambda a, b: a.result["words_per_s"] / b.result["words_per_s"] if b.result["words_per_s"] else math.nan
        )
        a, b = large_on.result["words_per_s"], large_off.result["words_per_s"]
        small = sorted(cell.result["words_per_s"] for cell in report.cells if _matches(cell, {**on, "concurrency": 64, "words": 1}))
        bound = None
        if small and b:
            fastest = small[len(small) // 2]
            bound = (fastest / b, f"{MAIN_MODEL} (compute next to nothing) batching on {fastest:,.0f} words/s / "
                                  f"{LARGE_MODEL} off {b:,.0f}")
        add("large model, 1 word, concurrency 64: batching", f"on {a:,.0f} / off {b:,.0f} words/s{_spread(ratios)}",
            ratio, ">= 2", lambda r: r >= 2, bound)
    memory = report.memory.get("batching on")
    if memory:
        add("idle RSS", f"{memory['idle_mib']:.0f} MiB", memory["idle_mib"] / 150, "<= 1 (150 MiB)", lambda r: r <= 1)
        add("RSS under load / idle", f"peak {memory['peak_main_mib']:.0f} MiB on {MAIN_MODEL} "
            f"/ idle {memory['idle_mib']:.0f} MiB", memory["peak_main_mib"] / memory["idle_mib"], "<= 1.5",
            lambda r: r <= 1.5)
    return checks


def _matches(cell: Cell, match: dict[str, Any]) -> bool:
    return all(getattr(cell, key) == value for key, value in match.items())


def _pairs(report: Report, first: dict[str, Any], second: dict[str, Any]) -> list[tuple[Cell, Cell]]:
    """The (first, second) cells measured in each repeat, in repeat order."""
    pairs = []
    for repeat in sorted({cell.repeat for cell in report.cells}):
        a = _find(report, repeat=repeat, **first)
        b = _find(report, repeat=repeat, **second)
        if a is not None and b is not None:
            pairs.append((a, b))
    return pairs


def _median(
    pairs: list[tuple[Cell, Cell]], ratio: Callable[[Cell, Cell], float]
) -> tuple[tuple[Cell, Cell], float, list[float]]:
    """The pair whose ratio is the median (the lower middle for an even count), that ratio, and every ratio."""
    ratios = [ratio(a, b) for a, b in pairs]
    middle = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]
    return pairs[middle], ratios[middle], ratios


def _spread(ratios: list[float]) -> str:
    if len(ratios) < 2:
        return ""
    return f"; median of {len(ratios)} repeats: {', '.join(f'{r:.2f}' for r in ratios)}"


def _handler_row(report: Report, concurrency: int, words: int) -> dict[str, Any] | None:
    for row in report.handler:
        if row["concurrency"] == concurrency and row["words"] == words:
            return row
    return None


def _latency_floor(report: Report, echo_p50_ms: float) -> tuple[float, str] | None:
    """Lowest latency ratio possible: the echo's round trip plus our handler's own time without gRPC."""
    row = _handler_row(report, 1, 1)
    if row is None:
        return None
    handler_ms = row["wall_us_per_request"] / 1000
    return (echo_p50_ms + handler_ms) / echo_p50_ms, (
        f"(echo p50 {echo_p50_ms:.3f} + handler alone {handler_ms:.3f} ms) / echo p50")


def _cpu_ceiling(report: Report, echo: Cell, concurrency: int, words: int, cores: int) -> tuple[float, str] | None:
    """Highest throughput ratio possible when the echo run already kept every core busy: the echo's CPU per
    request (its server + the load generator) plus our handler's own CPU without gRPC, against the echo's."""
    row = _handler_row(report, concurrency, words)
    if row is None or echo.server_cpu_us is None or echo.client_cpu_us is None:
        return None
    echo_us = echo.server_cpu_us + echo.client_cpu_us
    busy = echo_us * echo.result["requests_per_s"] / 1e6 / cores
    if busy < 0.85:
        return None  # the echo run left CPU idle: CPU is not what bounds it
    handler_us = row["cpu_us_per_request"]
    return echo_us / (echo_us + handler_us), (
        f"echo {echo_us:.0f} us CPU/request (cores {busy:.0%} busy) / (echo + handler alone {handler_us:.0f} us)")


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def render(report: Report, checks: list[Check]) -> str:
    """The markdown report."""
    m = report.machine
    lines = [
        "# Performance",
        "",
        "<!-- Generated by clients/benchmark.py; do not edit by hand: rerun the command below. -->",
        "",
        f"Command: `{report.command}`  ",
        f"Date: {report.started_utc} (UTC), {report.elapsed_s / 60:.1f} min  ",
        f"Machine: {m['nproc']} CPUs (`nproc`; {m['affinity']} usable), {m['cpu_model']}, {m['memory_gib']} GiB, "
        f"GPU: {m['gpu']}; load average at start {m['load_average_at_start']}  ",
        f"Software: Python {m['python']}, onnxruntime {m['onnxruntime']} (providers built in: "
        f"{', '.join(m['onnxruntime_providers_available'])}), grpcio {m['grpcio']}, numpy {m['numpy']}, "
        f"{m['platform']}  ",
        "Execution provider actually used (as the server reports it): "
        + ", ".join(f"{name}: {provider}" for name, provider in sorted(report.providers.items())) + "  ",
        f"Server flags: `{' '.join(report.server_flags) or '(defaults)'}`; each cell: "
        f"{report.plan['duration_s']} s measured after {report.plan['warmup_s']} s warm-up "
        f"({report.plan['long_duration_s']} s for 1024-word requests on the large model), words of "
        f"{WORD_LENGTH} random letters, one load-generator process per cell unless stated.",
        "",
        "## Targets",
        "",
        f"Each target's pair of cells is measured {report.plan.get('target_repeats', 1)} time(s): once in the "
        "tables below, then again, alternating which side goes first; the ratio is the median, and the "
        "figures shown are that repeat's.",
        "",
        "| target | measured | ratio | goal | result | best ratio this machine allows (estimate; see Ceilings) |",
        "|---|---|---:|---|---|---|",
    ]
    for check in checks:
        verdict = "-" if check.passed is None else ("pass" if check.passed else "**miss**")
        bound = f"{check.bound:.2f}: {check.bound_detail}" if check.bound is not None else "-"
        lines.append(f"| {check.name} | {check.detail} | {_fmt(check.ratio, 2)} | {check.goal} | {verdict} | {bound} |")
    lines += ["", CEILINGS]
    lines += [
        "",
        "## In-process limit",
        "",
        "Our one-hot encoding (server.alphabet) + an onnxruntime run (`session.run_async` on the session's run "
        "thread, waited for: the server's own path), one batch after another, the server's session options; no "
        "gRPC, no request parsing, no response building.",
        "",
        "| model | provider | batch (words) | ms per run | words/s |",
        "|---|---|---:|---:|---:|",
    ]
    for row in report.inprocess:
        lines.append(f"| {row['model']} | {row['provider']} | {row['batch_words']} | {row['ms_per_run']:.3f} | "
                     f"{row['words_per_s']:,.0f} |")
    lines += [
        "",
        "## Our handler without gRPC",
        "",
        f"`CharRnnService.Encode` called directly by that many coroutines ({MAIN_MODEL}, the servers' batch "
        "settings): request checks, one-hot, batcher, the hand-off to onnxruntime's thread and back, the run, response bytes, "
        "metrics; no transport. CPU is this process's, all threads; per request, what serving adds to a call.",
        "",
        "| concurrency | words/request | requests/s | CPU us/request | wall us/request |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in report.handler:
        lines.append(f"| {row['concurrency']} | {row['words']} | {row['requests_per_s']:,.0f} | "
                     f"{row['cpu_us_per_request']:.0f} | {row['wall_us_per_request']:.0f} |")
    lines += [
        "",
        "## Transport limit: grpc.aio echo",
        "",
        "A generic-handler grpc.aio service in its own process that answers each request (same size as a real "
        f"one) with a fixed payload the size of the server's response to it ({MAIN_MODEL}).",
        "",
        "| rpc | concurrency | words/request | response bytes | requests/s | words/s | p50 ms | p90 ms | p99 ms | "
        "server CPU us/req | client CPU us/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in report.cells:
        if cell.target == "echo" and cell.repeat == 0:
            r = cell.result
            lines.append(f"| {cell.rpc} | {cell.concurrency} | {cell.words} | {r['response_bytes']:,} | "
                         f"{r['requests_per_s']:,.0f} | {r['words_per_s']:,.0f} | {r['latency_ms']['p50']:.3f} | "
                         f"{r['latency_ms']['p90']:.3f} | {r['latency_ms']['p99']:.3f} | "
                         f"{_fmt(cell.server_cpu_us)} | {_fmt(cell.client_cpu_us)} |")
    for model, title in ((MAIN_MODEL, f"built-in `{MAIN_MODEL}` (alphabet 4, hidden 2, 3 layers)"),
                         (LARGE_MODEL, f"`{LARGE_MODEL}` from a checkpoint (alphabet {len(LARGE_ALPHABET)}, "
                                       f"hidden {LARGE_HIDDEN}, {LARGE_LAYERS} layers)")):
        lines += [
            "",
            f"## Server: {title}",
            "",
            "| rpc | batching | concurrency | words/request | requests/s | words/s | p50 ms | p90 ms | p99 ms | "
            "avg batch words | server CPU us/req | client CPU us/req | errors | peak RSS MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for cell in report.cells:
            if cell.target != "server" or cell.model != model or cell.repeat:
                continue
            r = cell.result
            errors = ", ".join(f"{count} {code}" for code, count in r["errors"].items()) or "-"
            lines.append(
                f"| {cell.rpc} | {'on' if cell.batching else 'off'} | {cell.concurrency} | {cell.words} | "
                f"{r['requests_per_s']:,.0f} | {r['words_per_s']:,.0f} | {r['latency_ms']['p50']:.3f} | "
                f"{r['latency_ms']['p90']:.3f} | {r['latency_ms']['p99']:.3f} | {_fmt(cell.avg_batch_words, 1)} | "
                f"{_fmt(cell.server_cpu_us)} | {_fmt(cell.client_cpu_us)} | {errors} | {_fmt(cell.peak_rss_mib, 0)} |"
            )
    if report.tuning:
        lines += [
            "",
            "## Tuning",
            "",
            "The two batching knobs, a server per setting, the same unary cells on each (measured in this run, one "
            "server after the other): `--max-queue-delay-ms` (how long a batch may wait for company once traffic "
            "is evidently concurrent) and `--run-threads` (onnxruntime threads per model = batches running at once).",
            "",
            "| server flags | model | concurrency | words/request | words/s | p50 ms | avg batch words |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in sorted(report.tuning, key=lambda r: (r["model"] != MAIN_MODEL, r["concurrency"], r["words"])):
            lines.append(f"| `{row['flags']}` | {row['model']} | {row['concurrency']} | {row['words']} | "
                         f"{row['words_per_s']:,.0f} | {row['p50_ms']:.3f} | {_fmt(row['avg_batch_words'], 1)} |")
        lines += ["", TUNING_NOTES]
    lines += [
        "",
        "## Memory",
        "",
        "Resident set of each server process (psutil, sampled every 50 ms; both models loaded). Idle: after start-up, "
        "before any load. Peak: the highest sample while driving that model; VmHWM: the kernel's high-water mark "
        "at the end of the run. onnxruntime's CPU memory arena keeps what its largest run needed: the large "
        "model's merged batches of up to --max-batch-words words are what lift its peak (lower that flag to "
        "bound it).",
        "",
        f"| server | idle MiB | peak under load, {MAIN_MODEL} | peak under load, {LARGE_MODEL} | VmHWM MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, memory in report.memory.items():
        lines.append(f"| {name} | {memory['idle_mib']:.0f} | {memory['peak_main_mib']:.0f} | "
                     f"{_fmt(memory.get('peak_large_mib'), 0)} | {_fmt(memory.get('hwm_mib'), 0)} |")
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


CEILINGS = """## Ceilings

The last column of the targets bounds each ratio with figures from this same run, where a bound applies:
- Latency (lower bound): the echo's round trip plus our handler's own time for one request without gRPC
  (table "Our handler without gRPC", concurrency 1). The handler's time is mostly the hand-off to
  onnxruntime's thread and back: onnxruntime never runs on the event loop, so every run costs a thread
  wake-up each way.
- Throughput against the echo (upper bound), when the echo run already kept every core busy (CPU columns
  of the echo table: its server plus the load generator): each of our requests costs at least that CPU
  plus our handler's own CPU without gRPC, so at most echo / (echo + handler) of the echo's rate fits on
  the same cores. This assumes gRPC costs no more for our handler than for the echo's (it costs more: the
  echo never parses a request), so the true bound is lower still.
- Large model batching (upper bound): batching on cannot serve one-word requests faster than the server
  serves them for the small model, where compute is next to nothing (same server, same run); divided by
  the large model's batching-off rate.
These are estimates from figures of the same run and share its noise (a measured ratio can land beyond
one when, say, the echo cell ran slow), so read a goal well beyond its estimate as out of reach on this
machine for any change to our code: only a machine with more cores than the load needs (or a faster
transport than grpc.aio) moves these bounds.
"""


TUNING_NOTES = """A delay buys bigger batches (fewer onnxruntime runs and hand-offs per request) at the price of
waiting: it pays where requests keep arriving within the delay (concurrency 64) and costs where the callers
that will come are already in the batch (concurrency 8). The server's default is 0 (never wait), as Triton's
is; set it for traffic of many concurrent small requests. One run thread per model leaves the event loop a
core on a small machine and lets batches grow while a run is going, which serves small models best; a
compute-bound load (the large model with 1024-word requests) is served faster by a second run thread, as
the last rows show: the default (1) favours the small models this service ships."""


NOTES = """## How to read this

- Throughput counts requests that completed inside the measured window (steady state, as perf_analyzer
  does); latency is per request (per message for streams), client-side, over TCP loopback. Streams: one
  stream per unit of concurrency, one message in flight on each.
- Client, servers and echo share the machine's cores (on a 2-core machine the load generator alone takes a
  large share of one), for the echo baseline and the server alike: that is why the targets are ratios
  measured in the same run, cell by cell (server batching on, off, then echo, for each shape). Other
  load on the machine (see the load average above) moves every number; rerun before trusting one cell.
- CPU us/req: CPU time of the serving process (every thread: event loop, gRPC's poller, onnxruntime) and
  of the load generator, per request sent during the cell (warm-up included).
- "avg batch words" is the server's own charrnn_batch_words histogram over the cell: the words each
  onnxruntime run carried. With batching off it is the request size.
- The queue delay (see Server flags) only lets a batch wait for company once traffic is evidently
  concurrent (several callers queued, or the first arrived while the model was busy); a lone request on an
  idle server never waits, so the concurrency-1 rows pay nothing for it.
- Every onnxruntime run is started with session.run_async on onnxruntime's own thread and its outcome
  posted back to the event loop: a thread wake-up each way that the echo never pays. On this VM a wake-up
  of an idle core costs tens of microseconds, which is most of "Our handler without gRPC" at concurrency 1.
- Where the server's time goes (py-spy on the server under 1-word load at concurrency 64, while
  developing, not in this run): about half of the event loop's samples are gRPC's own per-call work in
  its Cython layer (the echo pays it too), a fifth are our Python (checks, one-hot, batcher, response
  bytes, metrics), the rest epoll and thread hand-offs; for 1024-word requests the model run and the
  response bytes dominate.
"""


# ------------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m clients.benchmark", description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run (fewer, shorter cells)")
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"), help="markdown report to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="passed to the servers and used for the in-process runs")
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                        help="the servers' --max-queue-delay-ms: how long a batch may wait for company once "
                             "traffic is evidently concurrent (a lone request never waits)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                        help="extra charrnn-server flag (repeatable), e.g. --server-arg=--run-threads=1")
    parser.add_argument("--client-processes", type=int, default=1, help="load-generator processes per cell")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming cells")
    parser.add_argument("--no-tuning", action="store_true", help="skip the side-by-side batching-knob servers")
    parser.add_argument("--target-repeats", type=int, default=None,
                        help="measure each target's pair of cells this many times (default: 3, 1 with --quick)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything and write the report."""
    args = build_parser().parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.no_stream:
        plan = Plan(**{**asdict(plan), "stream": False})
    if args.target_repeats is not None:
        plan = Plan(**{**asdict(plan), "target_repeats": max(1, args.target_repeats)})
    command = "python -m clients.benchmark " + " ".join(shlex.quote(arg) for arg in (sys.argv[1:] if argv is None else argv))
    started = time.monotonic()
    report = Report(
        command=command.strip(),
        started_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        machine=machine_info(args.device),
        plan=asdict(plan),
        server_flags=["--max-queue-delay-ms", f"{args.max_queue_delay_ms:g}", *args.server_arg],
    )
    with tempfile.TemporaryDirectory(prefix="charrnn-benchmark-") as scratch:
        folder = Path(scratch)
        log("exporting the models")
        repository = export_repository(folder)
        log("in-process limit")
        from server.config import parse_config  # the servers' own reading of their flags

        run_threads = parse_config(report.server_flags, {}).run_threads
        report.inprocess = measure_inprocess(repository, args.device, run_threads, plan)
        log("handler without gRPC")
        report.handler = measure_handler(repository, args.device, report.server_flags, plan)
        with _servers(repository, folder, args.device, report.server_flags) as (servers, echo):
            report.providers = providers_of(servers[True])
            time.sleep(1.0)  # let start-up settle before reading idle memory
            idle = {batching: rss_mib(server.process.pid) for batching, server in servers.items()}
            sampler = RssSampler({server.name: server.process.pid for server in servers.values()})
            try:
                run_cells(report, plan, servers, echo, sampler, args.client_processes)
                run_target_repeats(report, plan, servers, echo, sampler, args.client_processes)
            finally:
                sampler.close()
            for batching, server in servers.items():
                # The main tables' cells only: the repeats come after the large model's big batches, whose
                # memory onnxruntime's arena keeps, and would charge it to the small model.
                cells = [c for c in report.cells if c.target == "server" and c.batching is batching and not c.repeat]
                peaks = [c.peak_rss_mib or 0.0 for c in cells]
                main_peaks = [c.peak_rss_mib or 0.0 for c in cells if c.model == MAIN_MODEL]
                large_peaks = [c.peak_rss_mib or 0.0 for c in cells if c.model == LARGE_MODEL]
                report.memory[f"batching {'on' if batching else 'off'}"] = {
                    "idle_mib": idle[batching],
                    "peak_main_mib": max(main_peaks, default=0.0),
                    "peak_large_mib": max(large_peaks, default=0.0) if large_peaks else float("nan"),
                    "peak_mib": max(peaks, default=0.0),
                    "hwm_mib": hwm_mib(server.process.pid) or float("nan"),
                }
        if not args.no_tuning:
            log("tuning: batching knobs side by side")
            run_tuning(report, plan, repository, folder, args.device, args.client_processes, args.server_arg)
    report.elapsed_s = time.monotonic() - started
    checks = evaluate(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report, checks))
    if args.json is not None:
        args.json.write_text(json.dumps({**asdict(report), "checks": [asdict(c) for c in checks]}, indent=2))
    log(f"wrote {args.out} in {report.elapsed_s / 60:.1f} min")
    for check in checks:
        verdict = "-" if check.passed is None else ("pass" if check.passed else "MISS")
        print(f"{verdict:5s} {check.name}: {check.detail} -> {_fmt(check.ratio, 2)} (goal {check.goal})")
    return 0


@contextmanager
def _servers(
    repository: Path, folder: Path, device: str, extra: Sequence[str]
) -> Iterator[tuple[dict[bool, ServerProcess], ServerProcess]]:
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


if __name__ == "__main__":
    sys.exit(main())
