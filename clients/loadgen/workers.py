"""One process's share of a load run: `concurrency` workers on one channel, each keeping one request outstanding.

Run is the shared clock and counters. In duration mode a request counts if it finishes inside the measured
window (steady state, as perf_analyzer counts); in requests mode, if it was sent while measuring, and the
workers stop once the budget is spent. A failed request is counted by its status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.synchronize
import time
from typing import Any

import grpc

from clients.bench.echo import ECHO_METHOD, ECHO_STREAM_METHOD
from clients.client import MAX_MESSAGE_BYTES
from clients.errors import error_label, is_rpc_retryable
from clients.loadgen.config import LoadConfig, Partial
from clients.loadgen.pool import ENCODE_METHOD, STREAM_METHOD, check_response

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # The client library's limit, as the server's default: a load generator sends what a client may send.
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
"""Message-size limits only: no service config, so gRPC retries nothing and every failure is counted."""


class Run:
    """The shared clock and counters of one process's workers."""

    def __init__(self, config: LoadConfig, budget: int | None) -> None:
        self.config = config
        self.budget = budget  # measured requests left to send (requests mode)
        self.measuring = False
        self.start = 0.0
        self.end = float("inf")
        self.part = Partial()

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

    def record(
        self, sent_at: float, done_at: float, sent_measuring: bool, error: grpc.RpcError | None, size: int
    ) -> None:
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
            label = error_label(error)
            part.errors[label] = part.errors.get(label, 0) + 1
            part.retryable_errors += is_rpc_retryable(error)
            return
        part.ok += 1
        part.latencies.append(done_at - sent_at)
        part.response_bytes = size


async def _unary_worker(run: Run, channel: grpc.aio.Channel, pool: list[bytes], offset: int) -> None:
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
            run.record(sent, time.perf_counter(), measured, error, 0)
            continue
        run.record(sent, time.perf_counter(), measured, None, len(data))
        if not checked:
            check_response(data, config.words_per_request)
            checked = True


async def _stream_worker(run: Run, channel: grpc.aio.Channel, pool: list[bytes], offset: int) -> None:
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
                check_response(data, config.words_per_request)
                checked = True
        await call.done_writing()
        await call.code()
    except grpc.aio.AioRpcError as error:  # a stream fails as a whole: count the message in flight
        now = time.perf_counter()
        run.record(now, now, run.measuring, error, 0)


async def run_process(
    config: LoadConfig, pool: list[bytes], first_worker: int, budget: int | None,
    barrier: multiprocessing.synchronize.Barrier | None,
) -> Partial:
    """Run config.concurrency workers on config.connections channels (TCP connections of their own, workers
    dealt round-robin) in this process's event loop; what they measured."""
    run = Run(config, budget)
    options = CHANNEL_OPTIONS if config.connections == 1 else [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(config.security.aio_channel(config.target, options))
            for _ in range(max(1, config.connections))
        ]
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), config.timeout_s)
        worker = _stream_worker if config.stream else _unary_worker

        def spawn() -> list[asyncio.Future[None]]:
            return [
                asyncio.ensure_future(worker(run, channels[index % len(channels)], pool, first_worker + index))
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
