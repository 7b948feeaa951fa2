"""Dynamic batching: concurrent requests for one model are merged into one onnxruntime run and split back.

The worker never waits for company that is not coming: it takes whatever is queued the moment a run
slot is free (so an idle server runs a lone request at once). With max_delay > 0 it waits up to max_delay
for more, but only while the batch is not full and concurrency is evident: the batch already holds several
callers, or one of them arrived while the batcher was busy (gathering or running other batches). A lone
request on an idle server is never delayed, whatever max_delay says.

Run slots: up to max_concurrent_runs batches may be running on the executor at the same time (the engine
passes its executor's thread count), so that on a CPU a second batch uses the second core while the first
one runs; requests that arrive while every slot is taken queue, and merge. A long queue is shared out
between the slots (batches of at least SPLIT_MIN_WORDS words) rather than taken whole by the first free
one, which would leave the other cores idle while it runs.

Every onnxruntime run happens on the executor, never on the event loop, so the loop keeps accepting and
answering requests while a batch runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from server.alphabet import EncodedWords
from server.errors import OverloadedError, ShuttingDownError
from server.runtime import BatchOutputs, ModelRuntime

SPLIT_MIN_WORDS = 64
"""With several run slots, a long queue is shared out between them, in batches of at least this many words."""


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Limits of one model's batcher."""

    max_batch_words: int = 1024
    """Largest merged batch, in words (a larger single request still runs, alone)."""
    max_delay_s: float = 0.0
    """How long a non-full batch of several callers may wait for more requests; 0 never waits."""
    max_queue_words: int = 65536
    """Words allowed to wait; beyond that requests get RESOURCE_EXHAUSTED."""


@dataclass(frozen=True, slots=True)
class RunStats:
    """Timing of the run a request rode in."""

    queue_s: float
    inference_s: float
    batch_words: int


@dataclass(slots=True)
class _Pending:
    encoded: EncodedWords
    h0: npt.NDArray[np.float32]
    c0: npt.NDArray[np.float32] | None
    future: asyncio.Future[tuple[BatchOutputs, RunStats]]
    enqueued: float = field(default_factory=time.perf_counter)
    behind: bool = False
    """Arrived while the worker was busy with another batch (evidence of concurrent traffic)."""

    @property
    def words(self) -> int:
        return len(self.encoded.lengths)


RunObserver = Callable[[str, int, float], None]
"""Called after each run with (model name, words in the batch, seconds in onnxruntime)."""


class Batcher:
    """Queues requests for one model and runs them in merged batches on the executor."""

    def __init__(
        self,
        model: ModelRuntime,
        executor: Executor,
        settings: BatchSettings,
        observer: RunObserver | None = None,
        max_concurrent_runs: int = 1,
    ) -> None:
        self.model = model
        self.settings = settings
        self.max_concurrent_runs = max(1, max_concurrent_runs)
        self._executor = executor
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._queued_words = 0
        self._gathering = False  # the worker holds a batch, waiting for company
        self._runs: set[asyncio.Task[None]] = set()  # batches running on the executor
        self._wakeup = asyncio.Event()
        self._closed = False
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.model.name}")

    async def close(self) -> None:
        """Refuse new work, finish what is queued, stop the worker."""
        self._closed = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker

    @property
    def queued_words(self) -> int:
        """Words waiting for a run."""
        return self._queued_words

    async def submit(
        self, encoded: EncodedWords, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None
    ) -> tuple[BatchOutputs, RunStats]:
        """Run these words (in some batch) and return the batch outputs restricted to them."""
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        words = len(encoded.lengths)
        if self._queued_words and self._queued_words + words > self.settings.max_queue_words:
            raise OverloadedError(
                f"model {self.model.name!r} is overloaded: {self._queued_words} words queued "
                f"(limit {self.settings.max_queue_words}); retry later"
            )
        busy = self._gathering or bool(self._runs)
        future: asyncio.Future[tuple[BatchOutputs, RunStats]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(encoded, h0, c0, future, behind=busy))
        self._queued_words += words
        self._wakeup.set()
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or len(self._runs) >= self.max_concurrent_runs:
                if self._closed and not self._queue:
                    break
                self._wakeup.clear()  # set by submit(), close() and every finished run
                await self._wakeup.wait()
                continue
            self._gathering = True
            try:
                batch = await self._take_batch()
            finally:
                self._gathering = False
            if not batch:
                continue
            try:
                merged = _merge(batch)
            except Exception as error:
                _fail(batch, error)
                continue
            run = loop.create_task(self._run_on_executor(batch, merged))
            self._runs.add(run)
            run.add_done_callback(self._run_done)
        if self._runs:
            await asyncio.gather(*self._runs, return_exceptions=True)

    def _run_done(self, run: asyncio.Task[None]) -> None:
        self._runs.discard(run)
        self._wakeup.set()

    def _pop(self) -> _Pending:
        item = self._queue.popleft()
        self._queued_words -= item.words
        return item

    async def _take_batch(self) -> list[_Pending]:
        limit = self.settings.max_batch_words
        if self.max_concurrent_runs > 1:  # share a long queue out between the slots (cores), not one giant batch
            share = -(-self._queued_words // self.max_concurrent_runs)
            limit = min(limit, max(share, SPLIT_MIN_WORDS))
        batch: list[_Pending] = []
        words = 0
        deadline = time.perf_counter() + self.settings.max_delay_s
        while True:
            while self._queue:
                if self._queue[0].future.cancelled():  # the caller gave up (deadline, cancellation): skip its words
                    self._pop()
                    continue
                if batch and words + self._queue[0].words > limit:
                    break
                item = self._pop()
                batch.append(item)
                words += item.words
            remaining = deadline - time.perf_counter()
            # Wait for company only when it is evidently coming (see the module doc).
            evident = len(batch) >= 2 or any(item.behind for item in batch)
            if not evident or words >= limit or remaining <= 0 or self._queue or self._closed:
                return batch
            self._wakeup.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races the event.
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def _run_on_executor(self, batch: list[_Pending], merged: _Merged) -> None:
        started = time.perf_counter()
        try:
            outputs, seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, _timed_run, self.model, *merged
            )
        except Exception as error:  # every caller of this batch, and no other, gets the failure
            _fail(batch, error)
            return
        self._split(batch, started, outputs, seconds)

    def _split(self, batch: list[_Pending], started: float, outputs: BatchOutputs, seconds: float) -> None:
        total_words = sum(item.words for item in batch)
        if self._observer is not None:
            self._observer(self.model.name, total_words, seconds)
        start = 0
        for item in batch:
            stop = start + item.words
            if not item.future.done():
                part = _slice(outputs, start, stop, int(item.encoded.lengths.max()))
                item.future.set_result((part, RunStats(started - item.enqueued, seconds, total_words)))
            start = stop


_Merged = tuple[EncodedWords, npt.NDArray[np.float32], npt.NDArray[np.float32] | None]


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


def _timed_run(
    model: ModelRuntime, encoded: EncodedWords, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None
) -> tuple[BatchOutputs, float]:
    started = time.perf_counter()
    outputs = model.run(encoded, h0, c0)
    return outputs, time.perf_counter() - started


def _merge(batch: list[_Pending]) -> _Merged:
    if len(batch) == 1:
        item = batch[0]
        return item.encoded, item.h0, item.c0
    encoded = EncodedWords(
        np.concatenate([item.encoded.indices for item in batch]),
        np.concatenate([item.encoded.lengths for item in batch]),
    )
    h0 = np.concatenate([item.h0 for item in batch], axis=1)
    c0 = None if batch[0].c0 is None else np.concatenate([item.c0 for item in batch if item.c0 is not None], axis=1)
    return encoded, h0, c0


def _slice(outputs: BatchOutputs, start: int, stop: int, max_len: int) -> BatchOutputs:
    return BatchOutputs(
        outputs.outputs[start:stop, :max_len],
        outputs.h_n[:, start:stop],
        None if outputs.c_n is None else outputs.c_n[:, start:stop],
    )


class DirectRunner:
    """No batching: every request gets its own onnxruntime run on the executor."""

    def __init__(self, model: ModelRuntime, executor: Executor, observer: RunObserver | None = None) -> None:
        self.model = model
        self._executor = executor
        self._observer = observer
        self._closed = False

    def start(self) -> None:
        """Nothing to start; present so both runners are used alike."""

    async def close(self) -> None:
        """Refuse new work."""
        self._closed = True

    async def submit(
        self, encoded: EncodedWords, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None
    ) -> tuple[BatchOutputs, RunStats]:
        """Run these words alone."""
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        queued = time.perf_counter()
        outputs, seconds = await asyncio.get_running_loop().run_in_executor(
            self._executor, _timed_run, self.model, encoded, h0, c0
        )
        words = len(encoded.lengths)
        if self._observer is not None:
            self._observer(self.model.name, words, seconds)
        waited = max(0.0, time.perf_counter() - queued - seconds)
        return outputs, RunStats(waited, seconds, words)
