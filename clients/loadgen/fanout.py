"""run_load(): a load run in this process, or spread over several (--processes), and its merged result.

Spawned processes (never forked: no inherited gRPC state) each run their share of the workers in their own
event loop and channel; a barrier starts their measurement windows together, so their throughputs add up.
A process that fails aborts the barrier and reports, so the parent never hangs waiting for it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import queue
import signal
from dataclasses import replace
from typing import Any

from clients.bench.echo import echo_request
from clients.loadgen.config import LoadConfig, LoadResult, Partial, merge
from clients.loadgen.pool import build_request_pool, fetch_alphabet
from clients.loadgen.workers import run_process


def _process_main(
    config: LoadConfig, pool: list[bytes], first_worker: int, budget: int | None,
    barrier: multiprocessing.synchronize.Barrier, results: Any,
) -> None:
    """A spawned load process: run its share, put ("ok", Partial) or ("error", message) on the results queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        part = asyncio.run(run_process(config, pool, first_worker, budget, barrier))
        results.put(("ok", part))
    except BaseException as error:  # report, don't hang the parent
        barrier.abort()
        results.put(("error", f"{type(error).__name__}: {error}"))


def _split(total: int, parts: int) -> list[int]:
    """total shared out as evenly as possible, the first shares one larger."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def run_load(config: LoadConfig) -> LoadResult:
    """Run the load described by config (in this process, or spread over config.processes) and merge results."""
    if config.concurrency < 1 or config.words_per_request < 1 or config.word_length < 1 or config.processes < 1:
        raise ValueError("concurrency, words per request, word length and processes must be at least 1")
    alphabet = "a" if config.echo else fetch_alphabet(config.target, config.model, config.timeout_s, config.security)
    pool = build_request_pool(
        config.model, alphabet, config.words_per_request, config.word_length, config.seed, config.fields
    )
    if config.echo:
        pool = [echo_request(request, config.echo_response_bytes) for request in pool]
    processes = min(config.processes, config.concurrency)
    concurrencies = _split(config.concurrency, processes)
    budgets: list[int | None] = (
        [None] * processes if config.requests is None else list(_split(config.requests, processes))
    )
    if processes == 1:
        parts = [asyncio.run(run_process(config, pool, 0, budgets[0], None))]
    else:
        parts = _run_processes(config, pool, concurrencies, budgets)
    return merge(config, parts, processes)


def _run_processes(
    config: LoadConfig, pool: list[bytes], concurrencies: list[int], budgets: list[int | None]
) -> list[Partial]:
    """Start one process per share, wait for each one's Partial (RuntimeError if one fails or goes silent)."""
    context = multiprocessing.get_context("spawn")  # no forked grpc state
    barrier = context.Barrier(len(concurrencies))
    results = context.Queue()
    workers = []
    first = 0
    for concurrency, budget in zip(concurrencies, budgets, strict=True):
        share = replace(config, concurrency=concurrency, processes=1)
        process = context.Process(
            target=_process_main, args=(share, pool, first, budget, barrier, results), daemon=True
        )
        process.start()
        workers.append(process)
        first += concurrency
    parts: list[Partial] = []
    failures: list[str] = []
    patience = config.warmup_s + (config.duration_s or 0.0) + config.timeout_s + 60.0
    for _ in workers:
        try:
            status, payload = results.get(timeout=patience)
        except queue.Empty:
            for process in workers:
                process.kill()
            raise RuntimeError(f"a load process sent no result within {patience:.0f} s") from None
        (parts.append(payload) if status == "ok" else failures.append(payload))
    for process in workers:
        process.join()
    if failures:
        raise RuntimeError(f"load process failed: {failures[0]}")
    return parts
