"""charrnn-loadgen: a closed-loop load generator for the charrnn.v1 service (think Triton's perf_analyzer).

N workers each keep exactly one request outstanding (concurrency N), every request carrying W words of
L letters drawn from the model's alphabet. The run is bounded by time (--duration) or by a request count
(--requests); it prints throughput (requests/s, words/s) and latency percentiles as text or JSON.

To keep the client from being what is measured:
- requests are serialised once, up front, and responses are not parsed (raw bytes on the wire; only the
  first response of each worker is decoded and checked);
- --processes P spreads the workers over P processes, each with its own event loop and channel; their
  measurement windows are aligned by a barrier and their results merged.

--stream drives EncodeStream instead (one stream per worker, one message in flight on each).
--echo drives the trivial echo service of `--serve-echo` (a grpc.aio generic handler returning a fixed
payload): the transport baseline, with requests of the same size as real ones and responses of
--echo-response-bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.synchronize
import os
import queue
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from proto.charrnn.v1 import charrnn_pb2 as pb

ENCODE_METHOD = "/charrnn.v1.CharRnn/Encode"
STREAM_METHOD = "/charrnn.v1.CharRnn/EncodeStream"
GET_MODEL_METHOD = "/charrnn.v1.CharRnn/GetModel"
ECHO_SERVICE = "charrnn.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
ECHO_STREAM_METHOD = f"/{ECHO_SERVICE}/EchoStream"
ECHO_HEADER_BYTES = 8
"""An echo request starts with the response size wanted (little-endian uint64), then a real request's bytes."""

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DISTINCT_REQUESTS = 64
"""Distinct requests in the pool the workers cycle through (fewer for very large requests)."""
POOL_WORD_BUDGET = 65536
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One load run."""

    target: str
    model: str
    concurrency: int = 1
    words_per_request: int = 1
    word_length: int = 8
    duration_s: float | None = 5.0
    """Measure for this long (ignored when requests is set)."""
    requests: int | None = None
    """Send exactly this many measured requests, then stop."""
    stream: bool = False
    processes: int = 1
    warmup_s: float = 0.5
    echo: bool = False
    echo_response_bytes: int = 0
    timeout_s: float = 120.0
    seed: int = 0

    @property
    def mode(self) -> str:
        """unary, stream, echo or echo-stream."""
        if self.echo:
            return "echo-stream" if self.stream else "echo"
        return "stream" if self.stream else "unary"


@dataclass(slots=True)
class _Partial:
    """What one process measured."""

    ok: int = 0
    issued: int = 0
    warmup: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    window_s: float = 0.0
    response_bytes: int = 0


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Merged results of a run; `latency_ms` holds p50, p90, p99, mean and max of successful requests."""

    mode: str
    target: str
    model: str
    concurrency: int
    words_per_request: int
    word_length: int
    processes: int
    duration_s: float
    requests: int
    words: int
    issued: int
    warmup_requests: int
    errors: dict[str, int]
    requests_per_s: float
    words_per_s: float
    latency_ms: dict[str, float]
    response_bytes: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """Human-readable report."""
        errors = ", ".join(f"{count} {code}" for code, count in sorted(self.errors.items())) or "none"
        lat = self.latency_ms
        return (
            f"{self.mode} on {self.target}, model {self.model!r}: concurrency {self.concurrency}, "
            f"{self.words_per_request} word(s)/request of {self.word_length} letters, {self.processes} process(es)\n"
            f"  requests:   {self.requests} ok in {self.duration_s:.2f} s; errors: {errors}; "
            f"{self.issued} sent in all ({self.warmup_requests} warm-up)\n"
            f"  throughput: {self.requests_per_s:,.1f} requests/s, {self.words_per_s:,.1f} words/s\n"
            f"  latency ms: p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  "
            f"mean {lat['mean']:.3f}  max {lat['max']:.3f}"
        )


# ----------------------------------------------------------------------------------------------- requests


def fetch_alphabet(target: str, model: str, timeout_s: float = 10.0) -> str:
    """The model's alphabet, from GetModel."""
    with grpc.insecure_channel(target) as channel:
        get = channel.unary_unary(
            GET_MODEL_METHOD,
            request_serializer=pb.GetModelRequest.SerializeToString,
            response_deserializer=pb.ModelMetadata.FromString,
        )
        metadata: pb.ModelMetadata = get(pb.GetModelRequest(name=model), timeout=timeout_s, wait_for_ready=True)
    return metadata.alphabet


def build_request_pool(
    model: str, alphabet: str, words_per_request: int, word_length: int, seed: int = 0
) -> list[bytes]:
    """Serialised EncodeRequests of random words, all of the same size."""
    rng = np.random.default_rng(seed)
    count = max(1, min(DISTINCT_REQUESTS, POOL_WORD_BUDGET // max(1, words_per_request)))
    letters = np.array(list(alphabet))
    pool = []
    for _ in range(count):
        picks = letters[rng.integers(0, len(letters), size=(words_per_request, word_length))]
        words = ["".join(row) for row in picks]
        pool.append(pb.EncodeRequest(model=model, words=words).SerializeToString())
    return pool


def echo_request(request: bytes, response_bytes: int) -> bytes:
    """An echo request the size of `request` plus a header asking for a response of response_bytes."""
    return response_bytes.to_bytes(ECHO_HEADER_BYTES, "little") + request


def _check_response(data: bytes, words: int) -> None:
    response = pb.EncodeResponse.FromString(data)
    if len(response.results) != words:
        raise RuntimeError(f"the server answered {len(response.results)} results for {words} words")
    bad = next((result for result in response.results if result.error), None)
    if bad is not None:
        raise RuntimeError(f"the server rejected word {bad.word!r}: {bad.error}")


# -------------------------------------------------------------------------------------------------- workers


class _Run:
    """The shared clock and counters of one process's workers."""

    def __init__(self, config: LoadConfig, budget: int | None) -> None:
        self.config = config
        self.budget = budget  # measured requests left to send (requests mode)
        self.measuring = False
        self.start = 0.0
        self.end = float("inf")
        self.part = _Partial()

    def take(self) -> bool:
        """May a worker send another request? (Counts it as sent, against the budget in requests mode.)"""
        if self.measuring:
            if self.budget is not None:
                if self.budget <= 0:
                    return False
                self.budget -= 1
            elif time.perf_counter() >= self.end:
                return False
        else:
            self.part.warmup += 1
        self.part.issued += 1
        return True

    def record(self, sent_at: float, done_at: float, sent_measuring: bool, error: str | None, size: int) -> None:
        """Book one finished request: in requests mode those sent while measuring count; in duration mode
        those that finish inside the window (steady state, as perf_analyzer counts)."""
        if self.config.requests is not None:
            counted = sent_measuring
        else:
            counted = self.measuring and self.start <= done_at <= self.end
        if not counted:
            return
        part = self.part
        if error is not None:
            part.errors[error] = part.errors.get(error, 0) + 1
            return
        part.ok += 1
        part.latencies.append(done_at - sent_at)
        part.response_bytes = size


async def _unary_worker(run: _Run, channel: grpc.aio.Channel, pool: list[bytes], offset: int) -> None:
    config = run.config
    call = channel.unary_unary(ECHO_METHOD if config.echo else ENCODE_METHOD)
    checked = config.echo
    index = offset
    while run.take():
        measured = run.measuring
        request = pool[index % len(pool)]
        index += 1
        sent = time.perf_counter()
        try:
            data = await call(request, timeout=config.timeout_s)
        except grpc.aio.AioRpcError as error:
            run.record(sent, time.perf_counter(), measured, error.code().name, 0)
            continue
        run.record(sent, time.perf_counter(), measured, None, len(data))
        if not checked:
            _check_response(data, config.words_per_request)
            checked = True


async def _stream_worker(run: _Run, channel: grpc.aio.Channel, pool: list[bytes], offset: int) -> None:
    config = run.config
    call = channel.stream_stream(ECHO_STREAM_METHOD if config.echo else STREAM_METHOD)(timeout=config.timeout_s)
    checked = config.echo
    index = offset
    try:
        while run.take():
            measured = run.measuring
            request = pool[index % len(pool)]
            index += 1
            sent = time.perf_counter()
            await call.write(request)
            data = await call.read()
            if data is grpc.aio.EOF:
                raise RuntimeError("the server closed the stream early")
            run.record(sent, time.perf_counter(), measured, None, len(data))
            if not checked:
                _check_response(data, config.words_per_request)
                checked = True
        await call.done_writing()
        await call.code()
    except grpc.aio.AioRpcError as error:  # a stream fails as a whole: count the message in flight
        now = time.perf_counter()
        run.record(now, now, run.measuring, error.code().name, 0)


async def _run_process(
    config: LoadConfig, pool: list[bytes], first_worker: int, budget: int | None,
    barrier: multiprocessing.synchronize.Barrier | None,
) -> _Partial:
    run = _Run(config, budget)
    async with grpc.aio.insecure_channel(config.target, options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), config.timeout_s)
        worker = _stream_worker if config.stream else _unary_worker

        def spawn() -> list[asyncio.Future[None]]:
            return [
                asyncio.ensure_future(worker(run, channel, pool, first_worker + index))
                for index in range(config.concurrency)
            ]

        async def begin() -> None:
            if barrier is not None:  # every process starts measuring at the same moment
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
            run.start = time.perf_counter()
            if config.requests is None:
                run.end = run.start + (config.duration_s if config.duration_s is not None else 5.0)
            run.measuring = True

        if config.warmup_s > 0:
            tasks = spawn()
            await asyncio.sleep(config.warmup_s)
            await begin()
        else:
            await begin()
            tasks = spawn()
        await asyncio.gather(*tasks)
        finished = time.perf_counter()
    run.part.window_s = (min(finished, run.end) if config.requests is None else finished) - run.start
    return run.part


def _process_main(
    config: LoadConfig, pool: list[bytes], first_worker: int, budget: int | None,
    barrier: multiprocessing.synchronize.Barrier, results: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        part = asyncio.run(_run_process(config, pool, first_worker, budget, barrier))
        results.put(("ok", part))
    except BaseException as error:  # report, don't hang the parent
        barrier.abort()
        results.put(("error", f"{type(error).__name__}: {error}"))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def run_load(config: LoadConfig) -> LoadResult:
    """Run the load described by config (in this process, or spread over config.processes) and merge results."""
    if config.concurrency < 1 or config.words_per_request < 1 or config.word_length < 1 or config.processes < 1:
        raise ValueError("concurrency, words per request, word length and processes must be at least 1")
    alphabet = "a" if config.echo else fetch_alphabet(config.target, config.model, config.timeout_s)
    pool = build_request_pool(config.model, alphabet, config.words_per_request, config.word_length, config.seed)
    if config.echo:
        pool = [echo_request(request, config.echo_response_bytes) for request in pool]
    processes = min(config.processes, config.concurrency)
    concurrencies = _split(config.concurrency, processes)
    budgets: list[int | None] = (
        [None] * processes if config.requests is None else list(_split(config.requests, processes))
    )
    if processes == 1:
        parts = [asyncio.run(_run_process(config, pool, 0, budgets[0], None))]
    else:
        parts = _run_processes(config, pool, concurrencies, budgets)
    return _merge(config, parts, processes)


def _run_processes(
    config: LoadConfig, pool: list[bytes], concurrencies: list[int], budgets: list[int | None]
) -> list[_Partial]:
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
    parts: list[_Partial] = []
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


def _merge(config: LoadConfig, parts: list[_Partial], processes: int) -> LoadResult:
    latencies = np.array([value for part in parts for value in part.latencies], dtype=np.float64) * 1000.0
    errors: dict[str, int] = {}
    for part in parts:
        for code, count in part.errors.items():
            errors[code] = errors.get(code, 0) + count
    ok = sum(part.ok for part in parts)
    window = max((part.window_s for part in parts), default=0.0)
    # Each process measured the same (barrier-aligned) window: throughputs add up.
    requests_per_s = sum(part.ok / part.window_s for part in parts if part.window_s > 0)

    def percentile(q: float) -> float:
        return float(np.percentile(latencies, q)) if latencies.size else float("nan")

    return LoadResult(
        mode=config.mode,
        target=config.target,
        model=config.model,
        concurrency=config.concurrency,
        words_per_request=config.words_per_request,
        word_length=config.word_length,
        processes=processes,
        duration_s=window,
        requests=ok,
        words=ok * config.words_per_request,
        issued=sum(part.issued for part in parts),
        warmup_requests=sum(part.warmup for part in parts),
        errors=errors,
        requests_per_s=requests_per_s,
        words_per_s=requests_per_s * config.words_per_request,
        latency_ms={
            "p50": percentile(50),
            "p90": percentile(90),
            "p99": percentile(99),
            "mean": float(latencies.mean()) if latencies.size else float("nan"),
            "max": float(latencies.max()) if latencies.size else float("nan"),
        },
        response_bytes=max((part.response_bytes for part in parts), default=0),
    )


# ----------------------------------------------------------------------------------------------- echo server


async def serve_echo(port_file: Path | None = None, address: str = "127.0.0.1", port: int = 0) -> None:
    """A trivial grpc.aio server (generic handler, raw bytes): each request gets a fixed payload of the size
    its header asks for. Runs until SIGTERM/SIGINT; writes {"port": N} to port_file once serving."""
    payloads: dict[int, bytes] = {}

    def payload(request: bytes) -> bytes:
        size = int.from_bytes(request[:ECHO_HEADER_BYTES], "little")
        data = payloads.get(size)
        if data is None:
            data = payloads[size] = bytes(size)
        return data

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return payload(request)

    async def echo_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            yield payload(request)

    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                ECHO_SERVICE,
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
                },
            ),
        )
    )
    bound = server.add_insecure_port(f"{address}:{port}")
    await server.start()
    if port_file is not None:
        port_file.write_text(json.dumps({"port": bound, "pid": os.getpid()}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


# ------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The charrnn-loadgen command line."""
    parser = argparse.ArgumentParser(
        prog="charrnn-loadgen",
        description="Closed-loop load generator for charrnn-server: fixed concurrency and words per request.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--target", default="127.0.0.1:50051", help="server host:port")
    add("--model", default="lstm", help="model to encode with")
    add("--concurrency", type=int, default=1, help="requests outstanding at any time")
    add("--words-per-request", type=int, default=1, help="words in each request (or stream message)")
    add("--word-length", type=int, default=8, help="letters per word (random letters of the model's alphabet)")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, default=5.0, help="seconds to measure")
    bound.add_argument("--requests", type=int, default=None, help="measured requests to send (instead of --duration)")
    add("--warmup", type=float, default=0.5, help="seconds of unmeasured load before measuring")
    add("--stream", action="store_true", help="drive EncodeStream: one stream per worker, one message in flight")
    add("--processes", type=int, default=1, help="spread the workers over this many processes")
    add("--timeout", type=float, default=120.0, help="per-RPC deadline in seconds")
    add("--seed", type=int, default=0, help="seed of the random words")
    add("--json", action="store_true", help="print the result as JSON")
    add("--echo", action="store_true", help="drive the echo server of --serve-echo instead of charrnn-server")
    add("--echo-response-bytes", type=int, default=0, help="with --echo: size of each echo response")
    add("--serve-echo", action="store_true", help="run the echo server (transport baseline) instead of load")
    add("--listen", default="127.0.0.1:0", help="with --serve-echo: host:port to listen on (port 0: any free port)")
    add("--port-file", type=Path, default=None, help="with --serve-echo: write the bound port here as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = build_parser().parse_args(argv)
    if args.serve_echo:
        host, _, port = args.listen.rpartition(":")
        asyncio.run(serve_echo(args.port_file, host or "127.0.0.1", int(port or 0)))
        return 0
    config = LoadConfig(
        target=args.target,
        model=args.model,
        concurrency=args.concurrency,
        words_per_request=args.words_per_request,
        word_length=args.word_length,
        duration_s=args.duration,
        requests=args.requests,
        stream=args.stream,
        processes=args.processes,
        warmup_s=args.warmup,
        echo=args.echo,
        echo_response_bytes=args.echo_response_bytes,
        timeout_s=args.timeout,
        seed=args.seed,
    )
    try:
        result = run_load(config)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()  # type: ignore[attr-defined]
        print(f"charrnn-loadgen: {args.target}: {code.name}: {details}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, TimeoutError) as error:
        print(f"charrnn-loadgen: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
