"""The limits without gRPC: onnxruntime on its own, and our whole Encode handler called directly.

measure_inprocess(): our one-hot encoding plus an onnxruntime run, one batch after another, run as the server
runs them (ModelRuntime.start_run: session.run_async on the session's run threads, waited for).
measure_handler(): CharRnnService.Encode on an engine built exactly as charrnn-server builds it
(server.core.engine.load_engine from a ServerConfig), called by `concurrency` coroutines with a stand-in for
the gRPC context. The server's public API is imported at the top, so a changed signature fails at import.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from clients.bench.plan import LARGE_MODEL, MAIN_MODEL, WORD_LENGTH, Plan, log
from clients.client import build_request
from export.manifest import scan_repository
from server.config import ServerConfig
from server.core.alphabet import WordIndices
from server.core.engine import load_engine
from server.core.runtime import ModelRuntime, RunOutputs, load_version
from server.grpc.charrnn_v1 import CharRnnService
from server.metrics import Metrics

HANDLER_SHAPES = ((1, 1), (64, 1), (64, 32))
"""(concurrency, words per request) at which the handler is measured without gRPC (the transport targets)."""
IDLE_SHAPES = ((1, 1), (1, 32))
"""Words per request at which one caller is measured with IDLE_GAP_S between its requests."""
IDLE_GAP_S = 0.0005
"""A lone gRPC client's next request comes a round trip later (0.4-0.8 ms here): the process sleeps in between,
and the handler then runs with cold caches. Back to back, the same handler costs far less per request. asyncio's
loop wakes on whole milliseconds, so the gap is about 1 ms whatever this asks: the rows record the gap measured."""


def random_words(alphabet: str, count: int, rng: np.random.Generator) -> list[str]:
    """`count` words of WORD_LENGTH random letters of the alphabet."""
    letters = np.array(list(alphabet))
    return ["".join(row) for row in letters[rng.integers(0, len(letters), size=(count, WORD_LENGTH))]]


def _run_once(
    model: ModelRuntime, encoded: WordIndices, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None
) -> None:
    """One onnxruntime run started as the server starts them, waited for on this thread."""
    finished = threading.Event()
    failures: list[BaseException] = []

    def done(outputs: RunOutputs | None, error: BaseException | None) -> None:
        if error is not None:
            failures.append(error)
        finished.set()

    model.start_run(encoded, h0, c0, done)
    finished.wait()
    if failures:
        raise failures[0]


def measure_inprocess(
    config: ServerConfig, plan: Plan, names: tuple[str, ...] = (MAIN_MODEL, LARGE_MODEL)
) -> list[dict[str, Any]]:
    """words/s of our one-hot encoding + an onnxruntime run for each batch size of the plan, for each model
    (its highest version), on config.device with config.run_threads (the servers' session options)."""
    rows = []
    for name in names:
        model = load_version(scan_repository(config.repository)[name][-1], config.device, config.run_threads)
        rng = np.random.default_rng(0)
        for batch in plan.batches:
            encoded = model.alphabet.indices(random_words(model.manifest.alphabet, batch, rng))
            h0 = model.zero_state(batch)
            c0 = np.zeros_like(h0) if model.manifest.has_cell_state else None
            _run_once(model, encoded, h0, c0)  # warm-up
            runs, started = 0, time.perf_counter()
            while True:
                _run_once(model, encoded, h0, c0)
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


class _NoGrpcContext:
    """What CharRnnService's Encode reads from a grpc.aio context, for calling it without gRPC."""

    def time_remaining(self) -> float | None:
        """No deadline."""
        return None

    async def abort_with_status(self, status: grpc.Status) -> None:
        """What server.grpc.status.abort calls on an error: fail the measurement, naming the status."""
        raise RuntimeError(f"{status.code.name}: {status.details}")


def measure_handler(config: ServerConfig, plan: Plan) -> list[dict[str, Any]]:
    """Our whole Encode handler without gRPC: request checks, one-hot, batcher, hand-off to onnxruntime's thread,
    response bytes, metrics - called directly by `concurrency` coroutines on an engine configured as
    charrnn-server is by the same config. What it costs per request (CPU of this process, all threads) is what
    the server adds to a gRPC call."""
    metrics = Metrics()
    engine = load_engine(config.repository, config.engine_settings(), metrics.observe_run)
    service = CharRnnService(metrics)
    service.attach(engine)
    alphabet = engine.model(MAIN_MODEL).manifest.alphabet

    async def measure_all() -> list[dict[str, Any]]:
        engine.start()
        try:
            rows = []
            shapes = [(*shape, 0.0) for shape in HANDLER_SHAPES] + [(*shape, IDLE_GAP_S) for shape in IDLE_SHAPES]
            for concurrency, words, idle_s in shapes:
                row = await _measure(service, alphabet, concurrency, words, plan, idle_s)
                rows.append(row)
                log(f"handler without gRPC c{concurrency} w{words} idle gap {idle_s * 1000:g} ms: "
                    f"{row['cpu_us_per_request']:.0f} us CPU/request, {row['wall_us_per_request']:.0f} us per request")
            return rows
        finally:
            await engine.close()

    return asyncio.run(measure_all())


async def _measure(
    service: CharRnnService, alphabet: str, concurrency: int, words: int, plan: Plan, idle_s: float = 0.0
) -> dict[str, Any]:
    """One shape: warm up for plan.warmup_s, then count the requests `concurrency` callers finish. A lone caller
    sends its next request in a later loop turn, as over gRPC (not in the turn whose run still holds the model's
    slot). With idle_s, each caller sleeps that long after every request, and the CPU the sleeps alone cost
    (the same loop without requests, measured first) is taken off: what a request costs when it comes to an
    idle process."""
    rng = np.random.default_rng(0)
    # Bytes, as gRPC hands them to the handler (it parses its own requests).
    requests = [build_request(MAIN_MODEL, random_words(alphabet, words, rng)).SerializeToString() for _ in range(64)]
    context = _NoGrpcContext()
    done = 0
    in_handler = 0.0  # seconds inside Encode, summed over the calls (used with idle_s: one caller)

    async def caller(index: int, until: float, encode: bool = True) -> None:
        nonlocal done, in_handler
        while time.perf_counter() < until:
            if encode:
                called = time.perf_counter()
                await service.Encode(requests[index % len(requests)], context)  # type: ignore[arg-type]
                in_handler += time.perf_counter() - called
            if idle_s or concurrency == 1:
                await asyncio.sleep(idle_s)
            index += 1
            done += 1

    sleep_cpu_us = 0.0
    if idle_s:  # what the sleeps and wake-ups alone cost, per iteration
        done = 0
        cpu = time.process_time()
        await caller(0, time.perf_counter() + plan.inprocess_s, encode=False)
        sleep_cpu_us = (time.process_time() - cpu) / max(done, 1) * 1e6
    await asyncio.gather(*(caller(i, time.perf_counter() + plan.warmup_s) for i in range(concurrency)))
    done, in_handler = 0, 0.0
    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(i, started + plan.inprocess_s * 2) for i in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    done = max(done, 1)
    return {
        "model": MAIN_MODEL, "concurrency": concurrency, "words": words, "requests": done,
        "idle_gap_ms": (elapsed - in_handler) / done * 1000 if idle_s else 0.0, "idle_cpu_us": sleep_cpu_us,
        "requests_per_s": done / elapsed,
        "wall_us_per_request": (in_handler if idle_s else elapsed * concurrency) / done * 1e6,
        "cpu_us_per_request": cpu / done * 1e6 - sleep_cpu_us,
    }
