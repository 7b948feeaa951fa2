"""Dynamic batching: concurrent requests for one model are merged into one onnxruntime run and split back.

The worker never waits for company that is not coming: it takes whatever is queued the moment the
previous run ends (so an idle server runs a lone request at once), and waits up to max_delay for more
only when max_delay > 0 and the batch is not yet full.
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


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Limits of one model's batcher."""

    max_batch_words: int = 1024
    """Largest merged batch, in words (a larger single request still runs, alone)."""
    max_delay_s: float = 0.0
    """How long a non-full batch may wait for more requests; 0 never waits."""
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

    @property
    def words(self) -> int:
        return len(self.encoded.lengths)


RunObserver = Callable[[str, int, float], None]
"""Called after each run with (model name, words in the batch, seconds in onnxruntime)."""


class Batcher:
    """Queues requests for one model and runs them in merged batches on an executor thread."""

    def __init__(
        self, model: ModelRuntime, executor: Executor, settings: BatchSettings, observer: RunObserver | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        self._executor = executor
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._queued_words = 0
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
        future: asyncio.Future[tuple[BatchOutputs, RunStats]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(encoded, h0, c0, future))
        self._queued_words += words
        self._wakeup.set()
        return await future

    async def _work(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._take_batch()
            if batch:
                await self._run(batch)

    async def _take_batch(self) -> list[_Pending]:
        limit = self.settings.max_batch_words
        batch: list[_Pending] = []
        words = 0
        deadline = time.perf_counter() + self.settings.max_delay_s
        while True:
            while self._queue and (not batch or words + self._queue[0].words <= limit):
                item = self._queue.popleft()
                self._queued_words -= item.words
                if item.future.cancelled():  # the caller gave up (deadline, cancellation): skip its words
                    continue
                batch.append(item)
                words += item.words
            remaining = deadline - time.perf_counter()
            if not batch or words >= limit or remaining <= 0 or self._queue or self._closed:
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                pass

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            merged = _merge(batch)
            outputs, seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, _timed_run, self.model, *merged
            )
        except Exception as error:  # every caller of this batch, and no other, gets the failure
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
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


def _timed_run(
    model: ModelRuntime, encoded: EncodedWords, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None
) -> tuple[BatchOutputs, float]:
    started = time.perf_counter()
    outputs = model.run(encoded, h0, c0)
    return outputs, time.perf_counter() - started


def _merge(
    batch: list[_Pending],
) -> tuple[EncodedWords, npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
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
