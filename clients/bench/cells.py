"""The load cells: charrnn-loadgen (in this process) against the servers and the echo, one shape at a time.

Cells are interleaved per shape (server batching on, off, then the echo) so that the cells a target compares
share conditions; a full run then measures the targets' pairs again (run_target_repeats), alternating which
side goes first. Each cell also records the server's and the load generator's CPU per request and the
average onnxruntime batch the server ran (its own charrnn_batch_words histogram). run_tuning() starts a server
per batching setting and runs the same cells on each.
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import psutil

from clients.bench.plan import LARGE_MODEL, MAIN_MODEL, MIB, TARGET_PAIRS, WORD_LENGTH, Cell, Plan, Report, log
from clients.bench.servers import RssSampler, batch_words_totals, start_server
from clients.loadgen.config import LoadConfig, LoadResult
from clients.loadgen.fanout import run_load
from clients.loadgen.pool import ENCODE_METHOD, build_request_pool, fetch_alphabet
from clients.loadgen.workers import CHANNEL_OPTIONS
from clients.processes import ServerProcess


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used."""
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
    """One closed-loop load run of the plan's duration (or duration_s) and warm-up; the echo if echo_bytes."""
    return run_load(
        LoadConfig(
            target=target, model=model, concurrency=concurrency, words_per_request=words, word_length=WORD_LENGTH,
            duration_s=duration_s or plan.duration_s, warmup_s=plan.warmup_s, stream=stream, processes=processes,
            echo=echo_bytes is not None, echo_response_bytes=echo_bytes or 0,
        )
    )


def response_bytes(server: ServerProcess, model: str, words: int, word_length: int = WORD_LENGTH) -> int:
    """Size of the server's response to the load generator's first request of that shape."""
    request = build_request_pool(model, fetch_alphabet(server.target, model), words, word_length)[0]
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        data: bytes = channel.unary_unary(ENCODE_METHOD)(request, timeout=120)
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
    """A load cell on the echo, answering payloads the size of the server's responses to the same requests."""
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
