"""Dynamic batching: concurrent requests for one model are merged into one onnxruntime run and split back.

Event-driven, with no worker task. A request is answered by one of two paths:

- At once, inside submit(), when the model is idle (nothing queued, nothing running, no caller still
  waiting for a queued batch's outcome), traffic is not evidently concurrent, and the RunPredictor
  (server/core/inline.py) knows the run to be tiny: one run of its own on the event loop, with no future, so
  the caller resumes without an extra event-loop turn. grpc.aio hands requests to the loop one per turn (its
  server accepts one call at a time), so such a request has no company to wait for, max_delay or not (queued,
  it would run at once too, one future and two loop turns later). The run's slot stays taken until the
  loop's next iteration, so other callers' requests handed over in that turn (other connections', a
  stream's) queue behind it and, with a max_delay, wait for company; the same caller's next request (an
  in-process caller's) does not count as company. Evidence of concurrent traffic (a request that found
  others queued or running, or callers waiting for a queued batch) sends every request to the queue for
  max_delay after the last such sign, so a burst or sustained load keeps merging rather than running one
  request per loop turn. Measured against the previous rule (the queue for every request with a delay; rig
  client, 2 cores, the server's defaults, alternated, 2026-12-07; first 3 x 6 s pairs without the
  max_delay hold, then 2 pairs with it): concurrency 1 p50 0.73-0.82 -> 0.71-0.74 ms at 1 word and
  0.84-0.90 -> 0.82 at 32 words; concurrency 8 +7 to +11 % requests/s at 1 word; concurrency 64 within
  noise (-5 to +14 %), at 1.5 instead of 2.0-2.2 words per run at 1 word and 54-57 instead of 70-76 at 32.
  A delay (the server's default is 5 ms) asks for merging at the price of waiting, and gets the queue
  whenever traffic is concurrent. Under load merging wins: a one-word run costs 17-24 us in a tight loop but
  80-90 us of server CPU between gRPC's calls (caches; docs/performance.md, "Floors"), so with 64 callers a
  batch of a few words saves more than its queue turns cost.
- Queued otherwise: a batch is handed to onnxruntime the moment a run slot is free, from submit(), from a
  run's completion (the slot is handed to the queue before the finished batch's results are split) or from
  the max-delay timer. Requests that arrive while the model is busy (a run on onnxruntime's thread) ride
  the next run together.

With max_delay > 0 the queue head waits up to max_delay for more, but only while the batch is not full and
concurrency is evident: several callers are queued, or the head arrived while the model was busy (runs in
flight or others queued). A lone request on an idle server is never delayed, whatever max_delay says.
With max_gap > 0 a waiting batch also stops waiting once max_gap has passed without a new request joining
the queue: it waits while company keeps coming and no longer. Under gRPC load requests arrive one per
event-loop turn, a few hundred microseconds apart, so at high concurrency a batch grows for the whole
max_delay, while a few clients, all of whom have joined, are not kept waiting for company that cannot come
(2 cores, 1-word requests, max_delay 5 ms: 8 clients 1,697 requests/s without the gap rule and 3,004 with
0.3 ms, as without any delay; 64 clients 3,263 -> 4,070 with 1 ms).

Run slots: up to max_concurrent_runs batches may run at once (the engine passes the model's onnxruntime run
threads), so that on a CPU a second batch uses the second core while the first one runs;
requests that arrive while every slot is taken queue, and merge. A long queue is shared out between the
slots (batches of at least SPLIT_MIN_WORDS words) rather than taken whole by the first free one, which
would leave the other cores idle while it runs.

Queued batches run on onnxruntime's own threads (ModelRuntime.start_run, session.run_async), except those a
RunPredictor (when the runner has one) predicts to be tiny, which run on the event loop itself; the outcome
is posted back with call_soon_threadsafe (inline: call_soon). That is one thread wake-up
each way, and the onnxruntime thread needs no Python (no GIL) to start: a Python executor thread costs a
second wake-up to take the GIL first (measured in-process: ~120 us per 1-word run with run_async against
~210-250 us through a ThreadPoolExecutor, on this 2-core VM).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.core.alphabet import WordIndices
from server.core.errors import OverloadedError, ShuttingDownError
from server.core.inline import RunPredictor
from server.core.runtime import ModelRuntime, RunOutputs

SPLIT_MIN_WORDS = 64
"""With several run slots, a long queue is shared out between them, in batches of at least this many words."""


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Limits of one model's batcher (the defaults are ServerConfig's, which builds these)."""

    max_batch_words: int
    """Largest merged batch, in words (a larger single request still runs, alone)."""
    max_delay_s: float
    """How long a non-full batch may wait for more requests once concurrency is evident; 0 never waits."""
    max_queue_words: int
    """Words allowed to wait; beyond that requests get RESOURCE_EXHAUSTED."""
    max_gap_s: float = 0.0
    """A waiting batch runs once no request has joined the queue for this long; 0: it waits all of max_delay."""


@dataclass(frozen=True, slots=True)
class RunStats:
    """Timing of the run a request rode in."""

    queue_s: float
    inference_s: float
    batch_words: int


@dataclass(slots=True)
class _Pending:
    letters: WordIndices
    h0: npt.NDArray[np.float32]
    c0: npt.NDArray[np.float32] | None
    future: asyncio.Future[tuple[RunOutputs, RunStats]]
    enqueued: float
    behind: bool
    """Arrived while the model was busy (runs in flight or others queued): evidence of concurrent traffic. A slot
    held only by the same caller's previous request, run at once, does not count (Batcher.submit)."""

    @property
    def words(self) -> int:
        return len(self.letters.lengths)


RunObserver = Callable[[str, int, float], None]
"""Called after each run with (model name, words in the batch, seconds in onnxruntime)."""

_Merged = tuple[WordIndices, npt.NDArray[np.float32], npt.NDArray[np.float32] | None]
_Outcome = Callable[[RunOutputs | None, BaseException | None, float], None]
"""Receives a run's outputs (or its error) and its seconds in onnxruntime, on the event loop."""


def _start_run(
    loop: asyncio.AbstractEventLoop, model: ModelRuntime, merged: _Merged, outcome: _Outcome,
    predictor: RunPredictor | None = None,
) -> None:
    """Start the batch on onnxruntime's threads, or run it here if the predictor says it is tiny; `outcome`
    runs on the event loop once it is done (never before this returns). Raises if onnxruntime refuses the run
    outright (then `outcome` is never called)."""
    key = 0
    if predictor is not None:
        key = _bucket(merged[0])
        if predictor.runs_inline(key):
            outputs, seconds = _run_inline(model, predictor, key, merged)
            loop.call_soon(outcome, outputs, None, seconds)
            return
    started = time.perf_counter()

    def observed(outputs: RunOutputs | None, error: BaseException | None, seconds: float) -> None:  # on the loop
        if predictor is not None and outputs is not None:
            predictor.observe(key, seconds, inline=False)
        outcome(outputs, error, seconds)

    def done(outputs: RunOutputs | None, error: BaseException | None) -> None:  # on an onnxruntime thread
        try:
            loop.call_soon_threadsafe(observed, outputs, error, time.perf_counter() - started)
        except BaseException:  # noqa: BLE001 - the event loop is closed: nobody is waiting for this run any more
            pass

    model.start_run(*merged, done)


def _run_inline(model: ModelRuntime, predictor: RunPredictor, key: int, merged: _Merged) -> tuple[RunOutputs, float]:
    """Run the batch here, on the event loop's thread, timed into the predictor; (outputs, seconds)."""
    started = time.perf_counter()
    outputs = model.run(*merged)
    seconds = time.perf_counter() - started
    predictor.observe(key, seconds, inline=True)
    return outputs, seconds


def _answered_now(
    model: ModelRuntime, predictor: RunPredictor, observer: RunObserver | None, merged: _Merged
) -> tuple[RunOutputs, RunStats] | None:
    """One request's run, done at once on the event loop if the predictor knows it to be tiny; else None."""
    key = _bucket(merged[0])
    if not predictor.predicts_inline(key):
        return None
    outputs, seconds = _run_inline(model, predictor, key, merged)
    words = len(merged[0].lengths)
    if observer is not None:
        observer(model.name, words, seconds)
    return outputs, RunStats(0.0, seconds, words)


def _bucket(letters: WordIndices) -> int:
    """The predictor's bucket of a batch (RunPredictor.key)."""
    return RunPredictor.key(len(letters.lengths), letters.longest)


class Batcher:
    """Queues requests for one model and runs them in merged batches on onnxruntime's threads."""

    def __init__(
        self,
        model: ModelRuntime,
        settings: BatchSettings,
        observer: RunObserver | None = None,
        max_concurrent_runs: int = 1,
        predictor: RunPredictor | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.max_concurrent_runs = max(1, max_concurrent_runs)
        self._observer = observer
        self._predictor = predictor
        """Decides which runs go inline (server/core/inline.py); None: every run on onnxruntime's thread."""
        self._queue: deque[_Pending] = deque()
        self._queued_words = 0
        self._running = 0  # batches started and not yet finished (a run done at once counts until released)
        self._waiting_callers = 0
        """Callers of submit() suspended on a queued batch's future (answered or not): concurrent traffic."""
        self._concurrent_until = 0.0
        """loop.time() until which traffic counts as concurrent: max_delay past the last request that found
        company (others queued or running, or callers waiting); until then even an idle model queues requests."""
        self._held_by: asyncio.Task[object] | None = None
        """The task whose run done at once holds a slot until the loop's next iteration (None: no such slot)."""
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._drained: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_arrival = 0.0
        """loop.time() at which the last request joined the queue (max_gap counts from it)."""

    def start(self) -> None:
        """Bind to the running event loop (call from the serving loop before submit)."""
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()

    async def close(self) -> None:
        """Refuse new work, run what is queued without waiting for company, return once every run is done."""
        self._closed = True
        if self._loop is None or self._drained is None:
            return
        self._dispatch()
        if self._running or self._queue:
            await self._drained.wait()

    @property
    def queued_words(self) -> int:
        """Words waiting for a run."""
        return self._queued_words

    async def submit(
        self, letters: WordIndices, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None
    ) -> tuple[RunOutputs, RunStats]:
        """Run these words (in some batch) and return the batch outputs restricted to them."""
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        loop = self._loop
        if loop is None:
            raise RuntimeError("Batcher.start() was not called")
        words = len(letters.lengths)
        if self._queued_words and self._queued_words + words > self.settings.max_queue_words:
            raise OverloadedError(
                f"model {self.model.name!r} is overloaded: {self._queued_words} words queued "
                f"(limit {self.settings.max_queue_words}); retry later"
            )
        now = loop.time()
        predictor = self._predictor  # tiny requests on an idle model run at once (see the module doc)
        if (predictor is not None and not self._queue and not self._running and not self._waiting_callers
                and now >= self._concurrent_until):
            answered = _answered_now(self.model, predictor, self._observer, (letters, h0, c0))
            if answered is not None:
                # Its run slot stays taken until the loop's next iteration: requests handed over in this same
                # turn (an asyncio client's, a stream's) queue behind it and then ride one run together.
                self._running += 1
                self._held_by = asyncio.current_task(loop)
                loop.call_soon(self._release_slot)
                return answered
        future: asyncio.Future[tuple[RunOutputs, RunStats]] = loop.create_future()
        busy = self._running > 0 or bool(self._queue)
        held_by = self._held_by
        if held_by is not None and not self._queue and self._running == 1 and held_by is asyncio.current_task(loop):
            busy = False  # the only slot taken is held by this caller's own previous request: no company
        if busy or self._waiting_callers:
            self._concurrent_until = now + self.settings.max_delay_s
        self._last_arrival = now
        self._queue.append(_Pending(letters, h0, c0, future, now, busy))
        self._queued_words += words
        self._dispatch()
        self._waiting_callers += 1
        try:
            return await future
        finally:
            self._waiting_callers -= 1

    def _release_slot(self) -> None:
        self._running -= 1
        self._held_by = None
        self._dispatch()

    def _dispatch(self) -> None:
        """Start batches while a run slot is free and the queue should not wait for company."""
        assert self._loop is not None
        while self._running < self.max_concurrent_runs:
            while self._queue and self._queue[0].future.cancelled():  # the caller gave up: skip its words
                self._pop()
            if not self._queue:
                break
            wait_until = self._wait_until()
            if wait_until is not None:
                if self._timer is None:
                    self._timer = self._loop.call_at(wait_until, self._on_timer)
                break
            self._start(self._take_batch())
        self._check_drained()

    def _wait_until(self) -> float | None:
        """When the queue head should stop waiting for company, or None to run now (see the module doc)."""
        delay = self.settings.max_delay_s
        if delay <= 0 or self._closed or self._queued_words >= self._batch_limit():
            return None
        head = self._queue[0]
        if len(self._queue) < 2 and not head.behind:
            return None  # no evidence that anyone else is coming
        deadline = head.enqueued + delay
        if self.settings.max_gap_s > 0:  # company has stopped coming: do not wait for more
            deadline = min(deadline, self._last_arrival + self.settings.max_gap_s)
        return deadline if deadline > self._loop.time() else None  # type: ignore[union-attr]

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _batch_limit(self) -> int:
        limit = self.settings.max_batch_words
        if self.max_concurrent_runs > 1:  # share a long queue out between the slots (cores), not one giant batch
            share = -(-self._queued_words // self.max_concurrent_runs)
            limit = min(limit, max(share, SPLIT_MIN_WORDS))
        return limit

    def _pop(self) -> _Pending:
        item = self._queue.popleft()
        self._queued_words -= item.words
        return item

    def _take_batch(self) -> list[_Pending]:
        limit = self._batch_limit()
        batch = [self._pop()]
        words = batch[0].words
        while self._queue:
            head = self._queue[0]
            if head.future.cancelled():
                self._pop()
                continue
            if words + head.words > limit:
                break
            batch.append(self._pop())
            words += head.words
        return batch

    def _start(self, batch: list[_Pending]) -> None:
        assert self._loop is not None
        dispatched = self._loop.time()
        try:
            _start_run(
                self._loop, self.model, _merge(batch),
                lambda outputs, error, seconds: self._finished(batch, dispatched, outputs, error, seconds),
                self._predictor,
            )
        except Exception as error:  # noqa: BLE001 - merging or starting failed: this batch's callers get it
            _fail(batch, error)
            return
        self._running += 1

    def _finished(
        self, batch: list[_Pending], dispatched: float, outputs: RunOutputs | None,
        error: BaseException | None, seconds: float,
    ) -> None:
        self._running -= 1
        try:
            self._dispatch()  # the free slot goes to the queue before this batch's results are split
            if outputs is None:  # every caller of this batch, and no other, gets the failure
                _fail(batch, error if error is not None else RuntimeError("run produced no outputs"))
                return
            total_words = sum(item.words for item in batch)
            if self._observer is not None:
                self._observer(self.model.name, total_words, seconds)
            start = 0
            for item in batch:
                stop = start + item.words
                if not item.future.done():
                    part = _slice(outputs, start, stop, item.letters.longest)
                    item.future.set_result((part, RunStats(dispatched - item.enqueued, seconds, total_words)))
                start = stop
        except Exception as failure:  # noqa: BLE001 - callers not yet answered get it rather than wait forever
            _fail(batch, failure)
        finally:
            self._check_drained()

    def _check_drained(self) -> None:
        if self._closed and not self._running and not self._queue and self._drained is not None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._drained.set()


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


def _merge(batch: list[_Pending]) -> _Merged:
    if len(batch) == 1:
        item = batch[0]
        return item.letters, item.h0, item.c0
    letters = WordIndices(
        np.concatenate([item.letters.indices for item in batch]),
        np.concatenate([item.letters.lengths for item in batch]),
        max(item.letters.longest for item in batch),
    )
    h0 = np.concatenate([item.h0 for item in batch], axis=1)
    c0 = None if batch[0].c0 is None else np.concatenate([item.c0 for item in batch if item.c0 is not None], axis=1)
    return letters, h0, c0


def _slice(outputs: RunOutputs, start: int, stop: int, max_len: int) -> RunOutputs:
    return RunOutputs(
        outputs.outputs[start:stop, :max_len],
        outputs.h_n[:, start:stop],
        None if outputs.c_n is None else outputs.c_n[:, start:stop],
    )


class DirectRunner:
    """No batching: every request gets its own onnxruntime run, at most max_concurrent_runs at a time (more
    would only queue inside onnxruntime's pool, whose full queue runs work on the caller's thread)."""

    def __init__(
        self, model: ModelRuntime, observer: RunObserver | None = None, max_concurrent_runs: int = 1,
        predictor: RunPredictor | None = None,
    ) -> None:
        self.model = model
        self._observer = observer
        self._predictor = predictor
        self._slots = asyncio.Semaphore(max(1, max_concurrent_runs))
        self._closed = False
        self._running = 0
        self._drained: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Bind to the running event loop (call from the serving loop before submit)."""
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()

    async def close(self) -> None:
        """Refuse new work; return once the runs already started are done."""
        self._closed = True
        if self._running and self._drained is not None:
            await self._drained.wait()

    async def submit(
        self, letters: WordIndices, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None
    ) -> tuple[RunOutputs, RunStats]:
        """Run these words alone."""
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        loop = self._loop
        if loop is None:
            raise RuntimeError("DirectRunner.start() was not called")
        if self._predictor is not None and not self._slots.locked():
            answered = _answered_now(self.model, self._predictor, self._observer, (letters, h0, c0))
            if answered is not None:
                return answered
        queued = loop.time()
        await self._slots.acquire()
        if self._closed:
            self._slots.release()
            raise ShuttingDownError("the server is shutting down")
        future: asyncio.Future[tuple[RunOutputs, RunStats]] = loop.create_future()
        words = len(letters.lengths)

        def finished(outputs: RunOutputs | None, error: BaseException | None, seconds: float) -> None:
            self._slots.release()
            self._running -= 1
            if self._closed and not self._running and self._drained is not None:
                self._drained.set()
            if self._observer is not None and outputs is not None:
                self._observer(self.model.name, words, seconds)
            if future.done():
                return
            if outputs is None:
                future.set_exception(error if error is not None else RuntimeError("run produced no outputs"))
            else:
                waited = max(0.0, loop.time() - queued - seconds)
                future.set_result((outputs, RunStats(waited, seconds, words)))

        try:
            _start_run(loop, self.model, (letters, h0, c0), finished, self._predictor)
        except BaseException:
            self._slots.release()
            raise
        self._running += 1
        return await future
