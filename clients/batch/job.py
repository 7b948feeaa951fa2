"""The batch job proper: chunks shared by every stream, written in input order; lanes that stream them.

A Job holds the chunks waiting to be sent (a priority queue by chunk number, so re-sent chunks go first) and
the answered ones waiting for the writer, which writes them strictly in input order, flushing at each chunk
boundary, and frees a place in the window for the reader. A Lane is one EncodeStream at a time over one
channel, up to STREAM_DEPTH chunks unanswered on it; when the stream fails in a retryable way (failures.classify)
its unanswered chunks go back to the Job for any lane to take, and the lane backs off and probes its server
(GetModel) before it takes chunks again, so a dead or hung server is handed no work meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import IO

import grpc

from clients.batch.failures import BACKOFF_INITIAL_S, BACKOFF_MAX_S, Backoff, FatalError, RetryableError, classify
from clients.batch.output import format_chunk
from clients.batch.progress import Progress
from clients.batch.records import Chunk
from clients.client import build_request
from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

STREAM_DEPTH = 4
"""Chunks one stream may have unanswered; the server works on up to 4 messages of a stream at once."""
STREAM_RECYCLE_CHUNKS = 64
"""A stream is closed and reopened after this many chunks, so round_robin rebalances over (restarted) replicas."""


class Job:
    """Shared state: chunks waiting to be sent, answered chunks waiting to be written, the in-order writer."""

    def __init__(self, model: str, retry_seconds: float, output: IO[bytes], progress: Progress,
                 window: threading.Semaphore, fields: Sequence[str] | None = None) -> None:
        self.model = model
        self.fields = fields
        """The arrays each record carries (--fields; None: all)."""
        self.retry_seconds = retry_seconds
        self.output = output
        self.progress = progress
        self.window = window
        self.ready: asyncio.PriorityQueue[tuple[int, Chunk]] = asyncio.PriorityQueue()
        self.answered: dict[int, Chunk] = {}
        self.total_chunks: int | None = None
        self.input_error: BaseException | None = None
        self.changed = asyncio.Event()
        self.failing: dict[int, Chunk] = {}
        self.last_error = ""

    def on_input(self, item: Chunk | BaseException | int) -> None:
        """A chunk read by the producer (an int: end of input, after that many chunks; an exception: reading failed)."""
        if isinstance(item, Chunk):
            if item.words:
                self.ready.put_nowait((item.seq, item))
            else:
                self.answered[item.seq] = item  # nothing to send: every record is an input error
        elif isinstance(item, int):
            self.total_chunks = item
        else:
            self.input_error = item
        self.changed.set()

    async def take(self) -> Chunk:
        """The next chunk to send (retried chunks first: they are the oldest)."""
        return (await self.ready.get())[1]

    def answer(self, chunk: Chunk, response: pb.EncodeResponse, target: str) -> None:
        """Check and store a chunk's response for the writer."""
        results = response.results
        if len(results) != len(chunk.words) or any(r.word != w for r, w in zip(results, chunk.words, strict=True)):
            raise FatalError(
                f"{target}: the answer to {chunk.span} does not match its words ({len(results)} results for "
                f"{len(chunk.words)} words)"
            )
        chunk.response = response
        chunk.failing_since = None
        self.failing.pop(chunk.seq, None)
        self.answered[chunk.seq] = chunk
        self.changed.set()

    def requeue(self, chunks: Sequence[Chunk], error: Exception) -> None:
        """Put unanswered chunks back for any stream to take; give up on one failing for --retry-seconds."""
        now = time.monotonic()
        self.last_error = str(error)
        for chunk in chunks:
            if chunk.failing_since is None:
                chunk.failing_since = now
                self.failing[chunk.seq] = chunk
            chunk.response = None
            self.ready.put_nowait((chunk.seq, chunk))
        self.check_failing()

    def check_failing(self) -> None:
        """Give up (FatalError) if some chunk has been failing for longer than --retry-seconds."""
        if not self.failing:
            return
        oldest = min(self.failing.values(), key=lambda chunk: (chunk.failing_since or 0.0, chunk.seq))
        if time.monotonic() - (oldest.failing_since or 0.0) > self.retry_seconds:
            raise FatalError(
                f"gave up on {oldest.span} after retrying for {self.retry_seconds:g} s (--retry-seconds); "
                f"last error: {self.last_error}"
            )

    async def write_all(self) -> None:
        """Write answered chunks in input order, flushing at each chunk boundary, until the input ends."""
        next_seq = 0
        while True:
            if self.input_error is not None:
                error = self.input_error
                if isinstance(error, FatalError):
                    raise error
                raise FatalError(f"reading the input failed: {type(error).__name__}: {error}") from error
            chunk = self.answered.pop(next_seq, None)
            if chunk is None:
                if self.total_chunks is not None and next_seq >= self.total_chunks:
                    return
                self.check_failing()  # also when every stream is busy probing its server
                self.changed.clear()
                try:  # not asyncio.wait_for, which in Python 3.11 can swallow a cancellation
                    async with asyncio.timeout(1.0):
                        await self.changed.wait()
                except TimeoutError:
                    pass
                continue
            data, failed = format_chunk(chunk)
            self.output.write(data)
            self.output.flush()
            self.window.release()
            self.progress.advance(len(chunk.records), failed)
            next_seq += 1


class Lane:
    """One EncodeStream at a time over one channel; reopened after failures (with backoff) or recycling."""

    def __init__(self, job: Job, target: str, channel: grpc.aio.Channel, timeout: float, name: str) -> None:
        self.job = job
        self.target = target
        self.channel = channel
        self.stub = pb_grpc.CharRnnStub(channel)
        self.timeout = timeout
        self.name = name
        self.pending: deque[Chunk] = deque()
        self.backoff = Backoff(min(BACKOFF_MAX_S, max(job.retry_seconds, BACKOFF_INITIAL_S)))
        self.failing_since: float | None = None

    async def run(self) -> None:
        """Take chunks and stream them until cancelled; a fatal error ends the task (and the job)."""
        while True:
            self.pending.append(await self.job.take())
            try:
                await self._session()
            except RetryableError as error:
                chunks = list(self.pending)
                self.pending.clear()
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    reason = str(error).removeprefix(f"{self.target}: ")
                    self.job.progress.note(f"{self.name}: {reason}; re-sending {len(chunks)} unanswered chunk(s)")
                self.job.requeue(chunks, error)
                await self._recover(error.retry_after_s)

    async def _recover(self, retry_after_s: float | None) -> None:
        """Back off (at least as long as the server's RetryInfo asked), then probe the server (GetModel) until it
        answers: a dead or hung server takes no chunks."""
        request = pb.GetModelRequest(name=self.job.model)
        while True:
            await asyncio.sleep(self.backoff.next(retry_after_s))
            try:
                await self.stub.GetModel(request, timeout=min(self.timeout, BACKOFF_MAX_S))
                return
            except grpc.aio.AioRpcError as error:
                problem = classify(error, self.target)
                if isinstance(problem, FatalError):
                    raise problem from None
                retry_after_s = problem.retry_after_s

    def _answered(self) -> None:
        if self.failing_since is not None:
            self.job.progress.note(f"{self.name}: answering again after {time.monotonic() - self.failing_since:.1f} s")
            self.failing_since = None
        self.backoff.reset()

    async def _session(self) -> None:
        call = self.stub.EncodeStream()
        credit = asyncio.Semaphore(STREAM_DEPTH - len(self.pending))
        expired = False
        send_error: BaseException | None = None

        async def send() -> None:
            nonlocal send_error
            chunk = self.pending[0]
            sent = 0
            try:
                while True:
                    chunk.sent_at = time.monotonic()
                    await call.write(build_request(self.job.model, chunk.words, report_invalid=True, fields=self.job.fields))
                    sent += 1
                    if sent >= STREAM_RECYCLE_CHUNKS:
                        break
                    await credit.acquire()
                    chunk = await self.job.take()
                    self.pending.append(chunk)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the call has ended ("RPC already finished"); the reader gets its status
            except Exception as error:  # noqa: BLE001 - e.g. a request that cannot be serialised: stop the reader
                send_error = error
                call.cancel()

        async def watch() -> None:
            nonlocal expired
            while True:
                await asyncio.sleep(min(1.0, self.timeout / 4))
                if self.pending and time.monotonic() - self.pending[0].sent_at > self.timeout:
                    expired = True
                    call.cancel()
                    return

        sender = asyncio.ensure_future(send())
        watchdog = asyncio.ensure_future(watch())
        try:
            while True:
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as error:
                    if send_error is not None:
                        raise FatalError(f"{self.target}: sending a chunk failed: {send_error!r}") from send_error
                    if expired:
                        raise RetryableError(f"{self.target}: no answer in {self.timeout:g} s (--timeout)") from None
                    raise classify(error, self.target) from None
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if send_error is not None and task is not None and not task.cancelling():
                        raise FatalError(f"{self.target}: sending a chunk failed: {send_error!r}") from send_error
                    if expired and task is not None and not task.cancelling():
                        raise RetryableError(f"{self.target}: no answer in {self.timeout:g} s (--timeout)") from None
                    raise
                if response is grpc.aio.EOF:
                    break
                if not self.pending:
                    raise FatalError(f"{self.target}: more responses than requests on one stream")
                self.job.answer(self.pending.popleft(), response, self.target)
                credit.release()
                self._answered()
            if self.pending:
                raise RetryableError(f"{self.target}: the stream ended with {len(self.pending)} chunk(s) unanswered")
            await sender
        finally:
            for task in (sender, watchdog):
                task.cancel()
            call.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)
