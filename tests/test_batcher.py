"""Dynamic batching: exact, actually merging, failure-isolating, bounded, and free for a lone request.

Unit tests, in-process (asyncio.run), over real ModelRuntime objects with real onnxruntime sessions on the
torch-free models of tests/onnx_models.py; ground truth is each request run alone. Where a test needs the model
run to fail or to block (poisoned batches, a full queue, cancelled callers), it wraps the real runtime in a
small subclass: no valid input makes onnxruntime fail or wait, so the fault has to be injected, and the
subclass still runs the real session for everything it lets through. Batched results against eager PyTorch,
and a real server under a burst, are in tests/test_batching_e2e.py.
"""

from __future__ import annotations

import asyncio
import functools
import random
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from server.core.alphabet import WordIndices
from server.core.batcher import Batcher, BatchSettings, DirectRunner, RunStats
from server.core.engine import EncodeResult, Engine, InitialState, Limits, WordEncoding
from server.core.errors import OverloadedError, Reason, ShuttingDownError
from server.core.inline import RunPredictor
from server.core.runtime import ModelRuntime, RunDone, RunOutputs, load_repository

pytestmark = pytest.mark.unit

MODELS = ("rnn", "rnn_multi_layers", "lstm", "gru", "wide_lstm")
LIMITS = Limits(max_words=4096, max_word_length=256)
BATCHING_TOLERANCE = 1e-6
"""A word batched with others against the same word alone: the same onnxruntime kernels, rounding aside."""


def batch_settings(
    max_batch_words: int = 1024, max_delay_s: float = 0.0, max_queue_words: int = 65536, max_gap_s: float = 0.0
) -> BatchSettings:
    return BatchSettings(max_batch_words, max_delay_s, max_queue_words, max_gap_s)


@pytest.fixture(scope="module")
def runtimes(unit_repository: Path) -> dict[str, ModelRuntime]:
    return load_repository(unit_repository, "cpu")


class Recorder:
    """A RunObserver keeping (model, batch words) of every run."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, int]] = []

    def __call__(self, model: str, words: int, seconds: float) -> None:
        self.runs.append((model, words))


@dataclass(frozen=True)
class Request:
    model: str
    words: list[str]
    states: list[InitialState]


def random_traffic(
    runtimes: dict[str, ModelRuntime], seed: int, count: int, models: Sequence[str] = MODELS
) -> list[Request]:
    """Mixed models, word counts, word lengths (1..20), with initial states on about a third of requests."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        name = rng.choice(models)
        manifest = runtimes[name].manifest
        letters = manifest.alphabet
        words = [
            "".join(rng.choice(letters) for _ in range(rng.choice([1, 2, 3, rng.randint(1, 20)])))
            for _ in range(rng.randint(1, 9))
        ]
        states: list[InitialState] = []
        if rng.random() < 0.35:
            shape = (manifest.num_layers, manifest.hidden_size)
            generator = np.random.default_rng(rng.randrange(2**32))
            for _ in words:
                hidden = generator.normal(size=shape).astype(np.float32)
                cell = generator.normal(size=shape).astype(np.float32) if manifest.has_cell_state else None
                states.append(InitialState(hidden, cell))
        requests.append(Request(name, words, states))
    return requests


def max_error(a: WordEncoding, b: WordEncoding) -> float:
    assert a.word == b.word
    assert a.outputs.shape == b.outputs.shape and a.hidden.shape == b.hidden.shape
    errors = [np.max(np.abs(a.outputs - b.outputs)), np.max(np.abs(a.hidden - b.hidden))]
    assert (a.cell is None) == (b.cell is None)
    if a.cell is not None and b.cell is not None:
        errors.append(np.max(np.abs(a.cell - b.cell)))
    return float(max(errors))


async def encode_all(engine: Engine, requests: Sequence[Request]) -> list[EncodeResult]:
    engine.start()
    try:
        return await asyncio.gather(*(engine.encode(r.model, r.words, r.states) for r in requests))
    finally:
        await engine.close()


# ---- exactness ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_equals_each_request_alone_on_concurrent_mixed_traffic(
    runtimes: dict[str, ModelRuntime], seed: int
) -> None:
    requests = random_traffic(runtimes, seed, count=80)
    recorder = Recorder()
    batched = asyncio.run(
        encode_all(Engine(runtimes, LIMITS, batch_settings(max_batch_words=64), observer=recorder), requests)
    )
    unbatched = asyncio.run(encode_all(Engine(runtimes, LIMITS, None), requests))
    largest = max(len(r.words) for r in requests)
    assert max(words for _, words in recorder.runs) > largest, "concurrent requests were never merged"
    for request, merged, alone in zip(requests, batched, unbatched, strict=True):
        assert len(merged.words) == len(alone.words) == len(request.words)
        for a, b in zip(merged.words, alone.words, strict=True):
            assert isinstance(a, WordEncoding) and isinstance(b, WordEncoding)
            assert max_error(a, b) <= BATCHING_TOLERANCE


def test_concurrent_requests_are_merged_into_one_run(runtimes: dict[str, ModelRuntime]) -> None:
    recorder = Recorder()
    engine = Engine(runtimes, LIMITS, batch_settings(max_batch_words=1024), run_threads=2, observer=recorder)
    requests = [Request("lstm", ["hello", "he"], []) for _ in range(20)]
    asyncio.run(encode_all(engine, requests))
    # The first two find the engine's two run slots free and start at once (a lone request never waits);
    # the other 18 queue behind them and ride one run together.
    assert sorted(words for _, words in recorder.runs) == [2, 2, 36]


def test_results_report_the_batch_they_rode_in(runtimes: dict[str, ModelRuntime]) -> None:
    engine = Engine(runtimes, LIMITS, batch_settings(max_batch_words=6), run_threads=2)
    results = asyncio.run(encode_all(engine, [Request("rnn", ["hel", "lo"], []) for _ in range(6)]))
    # Two start alone in the two free run slots; the four queued behind them fill a 6-word batch, then 2.
    assert [result.stats.batch_words for result in results if result.stats] == [2, 2, 6, 6, 6, 2]


# ---- failures stay inside their batch ------------------------------------------------------------------------------

POISON_LENGTH = 13


class PoisonedRuntime(ModelRuntime):
    """The real runtime, except that a batch holding a word of POISON_LENGTH letters is handed to onnxruntime
    with int64 lengths, which onnxruntime itself refuses (on its own thread, through the run's callback)."""

    def start_run(
        self, encoded: WordIndices, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None, done: RunDone
    ) -> None:
        if POISON_LENGTH in encoded.lengths.tolist():
            encoded = WordIndices(encoded.indices, encoded.lengths.astype(np.int64), encoded.longest)
        super().start_run(encoded, h0, c0, done)


def poisoned(outcome: object) -> bool:
    return isinstance(outcome, RuntimeError) and "onnxruntime run failed" in str(outcome) and "int32" in str(outcome)


def test_a_failure_reaches_every_caller_of_its_batch_and_no_other(runtimes: dict[str, ModelRuntime]) -> None:
    model = PoisonedRuntime(runtimes["lstm"].folder, "cpu")
    recorder = Recorder()
    engine = Engine({"lstm": model}, LIMITS, batch_settings(max_batch_words=4), run_threads=2, observer=recorder)
    poison = "h" * POISON_LENGTH
    # Submitted together, in order: A and B find the two run slots free and start alone at once; the rest
    # queue behind them and are taken in order, 4 words at a time: [C, D], [E, F], [G, H].
    requests = [
        Request("lstm", ["he", "ll"], []),  # A
        Request("lstm", ["lo", "eh"], []),  # B
        Request("lstm", ["lo", poison], []),  # C: poisons C and D
        Request("lstm", ["ol", "eh"], []),  # D
        Request("lstm", ["hole", "o"], []),  # E
        Request("lstm", ["e", "l"], []),  # F
        Request("lstm", [poison, "e"], []),  # G: poisons G and H
        Request("lstm", ["e", "l"], []),  # H
    ]

    async def run_all() -> list[EncodeResult | BaseException]:
        engine.start()
        try:
            return await asyncio.gather(
                *(engine.encode(r.model, r.words) for r in requests), return_exceptions=True
            )
        finally:
            await engine.close()

    outcomes = asyncio.run(run_all())
    failed = [poisoned(outcome) for outcome in outcomes]
    assert failed == [False, False, True, True, False, False, True, True]
    assert sorted(words for _, words in recorder.runs) == [2, 2, 4]  # only the healthy batches completed
    healthy = outcomes[4]
    assert isinstance(healthy, EncodeResult) and [w.word for w in healthy.words] == ["hole", "o"]  # type: ignore[union-attr]


class GatedRuntime(ModelRuntime):
    """The real runtime, except that each run first waits for the test to open the gate."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, "cpu")
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.waiting = 0

    def start_run(
        self, encoded: WordIndices, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None, done: RunDone
    ) -> None:
        self.waiting += 1
        self.entered.set()

        def after_the_gate() -> None:
            if self.gate.wait(timeout=30):
                super(GatedRuntime, self).start_run(encoded, h0, c0, done)
            else:
                done(None, TimeoutError("the test never opened the gate"))

        threading.Thread(target=after_the_gate, daemon=True).start()


async def _until(condition: threading.Event) -> None:
    deadline = time.monotonic() + 10
    while not condition.is_set():
        assert time.monotonic() < deadline, "the run never started"
        await asyncio.sleep(0.001)


def start_submit(
    runner: Batcher | DirectRunner, model: ModelRuntime, words: list[str]
) -> asyncio.Future[tuple[RunOutputs, RunStats]]:
    """Submit words (fresh states) as a task of their own, so a test can hold several in flight."""
    return asyncio.ensure_future(runner.submit(model.alphabet.indices(words), model.zero_state(len(words)), None))


def test_a_full_queue_answers_overloaded_instead_of_hanging(runtimes: dict[str, ModelRuntime]) -> None:
    model = GatedRuntime(runtimes["rnn"].folder)
    batcher = Batcher(model, batch_settings(max_batch_words=4, max_queue_words=6))

    submit = functools.partial(start_submit, batcher, model)

    async def scenario() -> None:
        batcher.start()
        running = submit(["hello", "he"])  # taken at once; its run waits at the gate
        await _until(model.entered)
        queued = [submit(["hel", "lo"]), submit(["ho", "le"]), submit(["oh", "eh"])]  # 6 words: the limit
        await asyncio.sleep(0)
        assert batcher.queued_words == 6
        with pytest.raises(OverloadedError) as raised:
            await asyncio.wait_for(batcher.submit(model.alphabet.indices(["l"]), model.zero_state(1), None), 1.0)
        assert raised.value.reason == Reason.QUEUE_FULL and raised.value.retry_after_s
        assert "is overloaded: 6 words queued (limit 6)" in raised.value.message
        model.gate.set()
        outputs = await asyncio.wait_for(asyncio.gather(running, *queued), 30)
        assert [len(result[0].h_n[0]) for result in outputs] == [2, 2, 2, 2]
        assert batcher.queued_words == 0
        await batcher.close()

    try:
        asyncio.run(scenario())
    finally:
        model.gate.set()


class RefusingRuntime(ModelRuntime):
    """The real runtime, except that starting a batch with a word of POISON_LENGTH letters raises at once."""

    def start_run(
        self, encoded: WordIndices, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None, done: RunDone
    ) -> None:
        if POISON_LENGTH in encoded.lengths.tolist():
            raise RuntimeError("refused outright")
        super().start_run(encoded, h0, c0, done)


@pytest.mark.parametrize("batching", [True, False], ids=["batcher", "direct"])
def test_a_run_refused_outright_fails_its_callers_and_frees_its_slot(
    runtimes: dict[str, ModelRuntime], batching: bool
) -> None:
    model = RefusingRuntime(runtimes["rnn"].folder, "cpu")
    runner: Batcher | DirectRunner = Batcher(model, batch_settings()) if batching else DirectRunner(model)

    one_state = model.zero_state(1)

    async def scenario() -> None:
        runner.start()
        for _ in range(3):  # with one run slot, a leaked slot would hang the next request
            with pytest.raises(RuntimeError, match="refused outright"):
                await asyncio.wait_for(runner.submit(model.alphabet.indices(["h" * POISON_LENGTH]), one_state, None), 10)
            outputs, _ = await asyncio.wait_for(runner.submit(model.alphabet.indices(["hello"]), one_state, None), 10)
            assert outputs.h_n.shape == (1, 1, 2)
        await asyncio.wait_for(runner.close(), 10)

    asyncio.run(scenario())


@pytest.mark.parametrize("batching", [True, False], ids=["batcher", "direct"])
def test_close_waits_for_runs_already_started(runtimes: dict[str, ModelRuntime], batching: bool) -> None:
    model = GatedRuntime(runtimes["rnn"].folder)
    runner: Batcher | DirectRunner = Batcher(model, batch_settings()) if batching else DirectRunner(model)

    async def scenario() -> None:
        runner.start()
        running = start_submit(runner, model, ["hello"])
        await _until(model.entered)
        closing = asyncio.ensure_future(runner.close())
        await asyncio.sleep(0.05)
        assert not closing.done(), "close() returned while a run was still going"
        with pytest.raises(ShuttingDownError):
            await runner.submit(model.alphabet.indices(["he"]), model.zero_state(1), None)
        model.gate.set()
        await asyncio.wait_for(closing, 10)
        outputs, _ = await running  # the run that was going still answered its caller
        assert outputs.h_n.shape == (1, 1, 2)

    try:
        asyncio.run(scenario())
    finally:
        model.gate.set()


def test_without_batching_runs_still_go_one_slot_at_a_time(runtimes: dict[str, ModelRuntime]) -> None:
    model = GatedRuntime(runtimes["rnn"].folder)
    runner = DirectRunner(model, max_concurrent_runs=1)

    async def scenario() -> None:
        runner.start()
        first = start_submit(runner, model, ["hello"])
        second = start_submit(runner, model, ["he"])
        await _until(model.entered)
        await asyncio.sleep(0.05)
        assert model.waiting == 1, "a second run was handed to onnxruntime while the only slot was taken"
        model.gate.set()
        a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert model.waiting == 2 and a[0].h_n.shape == b[0].h_n.shape == (1, 1, 2)
        await runner.close()

    try:
        asyncio.run(scenario())
    finally:
        model.gate.set()


def test_a_failure_while_splitting_results_reaches_the_callers_instead_of_hanging(
    runtimes: dict[str, ModelRuntime],
) -> None:
    model = runtimes["rnn"]
    calls = []

    def observer(name: str, words: int, seconds: float) -> None:
        calls.append(words)
        if len(calls) == 1:
            raise RuntimeError("observer broke")

    batcher = Batcher(model, batch_settings(), observer)

    async def scenario() -> None:
        batcher.start()
        with pytest.raises(RuntimeError, match="observer broke"):
            await asyncio.wait_for(batcher.submit(model.alphabet.indices(["hello"]), model.zero_state(1), None), 10)
        again = batcher.submit(model.alphabet.indices(["he"]), model.zero_state(1), None)
        outputs, _ = await asyncio.wait_for(again, 10)
        assert outputs.h_n.shape == (1, 1, 2)
        await asyncio.wait_for(batcher.close(), 10)

    asyncio.run(scenario())
    assert calls == [1, 1]


def test_cancelled_callers_words_are_skipped(runtimes: dict[str, ModelRuntime]) -> None:
    model = GatedRuntime(runtimes["rnn"].folder)
    recorder = Recorder()
    batcher = Batcher(model, batch_settings(max_batch_words=100), recorder)

    submit = functools.partial(start_submit, batcher, model)

    async def scenario() -> None:
        batcher.start()
        first = submit(["hello"])
        await _until(model.entered)
        kept_a, dropped, kept_b = submit(["he", "lo"]), submit(["o", "h", "e", "l"]), submit(["hole"])
        await asyncio.sleep(0)
        dropped.cancel()
        model.gate.set()
        _, a, b = await asyncio.wait_for(asyncio.gather(first, kept_a, kept_b), 30)
        with pytest.raises(asyncio.CancelledError):
            await dropped
        await batcher.close()
        assert a[0].h_n.shape[1] == 2 and b[0].h_n.shape[1] == 1

    try:
        asyncio.run(scenario())
    finally:
        model.gate.set()
    assert recorder.runs == [("rnn", 1), ("rnn", 3)]  # the cancelled request's 4 words never ran


def test_batches_run_side_by_side_up_to_the_limit_then_merge(runtimes: dict[str, ModelRuntime]) -> None:
    model = GatedRuntime(runtimes["rnn"].folder)
    recorder = Recorder()
    batcher = Batcher(model, batch_settings(max_batch_words=100), recorder, max_concurrent_runs=2)

    submit = functools.partial(start_submit, batcher, model)

    async def scenario() -> None:
        batcher.start()
        first = submit(["hello"])
        await _until(model.entered)
        second = submit(["he", "lo"])  # a second slot is free: runs beside the first
        deadline = time.monotonic() + 10
        while model.waiting < 2:
            assert time.monotonic() < deadline, "the second batch did not start beside the first"
            await asyncio.sleep(0.001)
        rest = [submit(["o"]), submit(["h", "e", "l"])]  # both slots taken: these queue and merge
        await asyncio.sleep(0.01)
        assert batcher.queued_words == 4
        model.gate.set()
        await asyncio.wait_for(asyncio.gather(first, second, *rest), 30)
        await batcher.close()

    try:
        asyncio.run(scenario())
    finally:
        model.gate.set()
    assert sorted(words for _, words in recorder.runs) == [1, 2, 4]


# ---- latency: a lone request is never held back ---------------------------------------------------------------


def _lone_latencies(runner: Batcher | DirectRunner, model: ModelRuntime, repeats: int = 20) -> list[float]:
    """Seconds each of `repeats` back-to-back requests took, one at a time (no company ever comes)."""
    async def scenario() -> list[float]:
        runner.start()
        encoded, h0 = model.alphabet.indices(["hello"]), model.zero_state(1)
        took = []
        for _ in range(repeats):
            started = time.perf_counter()
            await runner.submit(encoded, h0, None)
            took.append(time.perf_counter() - started)
        await runner.close()
        return took

    return asyncio.run(scenario())


@pytest.mark.parametrize("inline", [False, True], ids=["thread", "inline"])
def test_a_lone_request_does_not_wait_for_max_delay(runtimes: dict[str, ModelRuntime], inline: bool) -> None:
    """On either path (a run on onnxruntime's thread, or inline from the queue, as max_delay makes it): the
    caller's next request follows its previous one closely, and must not be taken for company coming."""
    model = runtimes["rnn"]
    predictor = _fast_predictor() if inline else None
    batched = _lone_latencies(Batcher(model, batch_settings(max_delay_s=0.2), predictor=predictor), model)
    direct = _lone_latencies(DirectRunner(model, predictor=predictor), model)
    # Every request, not just the best: one that followed its predecessor too closely used to look "behind".
    assert max(batched) < 0.1, f"a lone request took {max(batched) * 1000:.1f} ms with max_delay 200 ms"
    assert statistics.median(batched) < statistics.median(direct) + 0.005, (batched, direct)


def test_max_delay_gathers_company_once_several_callers_share_a_batch(runtimes: dict[str, ModelRuntime]) -> None:
    model = runtimes["rnn"]
    recorder = Recorder()
    batcher = Batcher(model, batch_settings(max_batch_words=100, max_delay_s=0.3), recorder)

    async def submit(words: list[str], after: float) -> None:
        await asyncio.sleep(after)
        await batcher.submit(model.alphabet.indices(words), model.zero_state(len(words)), None)

    async def scenario() -> None:
        batcher.start()
        # Two callers arrive together: the first finds the model idle and runs at once; the second arrived
        # while it ran (concurrency is evident), so it waits and the third, 50 ms later, rides with it.
        await asyncio.gather(submit(["he"], 0), submit(["lo"], 0), submit(["hole", "o"], 0.05))
        await batcher.close()

    asyncio.run(scenario())
    assert recorder.runs == [("rnn", 1), ("rnn", 3)]


def _gap_scenario(
    runtimes: dict[str, ModelRuntime], max_delay_s: float, max_gap_s: float, arrivals: Sequence[float]
) -> tuple[list[tuple[str, int]], float]:
    """Two callers together (the first runs alone, the second waits: concurrency is evident), then one
    more 1-letter caller at each of `arrivals` (seconds from the start); (runs, seconds until all answered)."""
    model = runtimes["rnn"]
    recorder = Recorder()
    batcher = Batcher(model, batch_settings(max_delay_s=max_delay_s, max_gap_s=max_gap_s), recorder)

    async def submit(after: float) -> None:
        await asyncio.sleep(after)
        await batcher.submit(model.alphabet.indices(["h"]), model.zero_state(1), None)

    async def scenario() -> float:
        batcher.start()
        started = time.perf_counter()
        await asyncio.gather(submit(0), submit(0), *(submit(at) for at in arrivals))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    elapsed = asyncio.run(scenario())
    return recorder.runs, elapsed


def test_after_max_gap_without_company_a_waiting_batch_runs(runtimes: dict[str, ModelRuntime]) -> None:
    """max_gap: the batch waits while requests keep joining it, and not the rest of max_delay once they stop."""
    runs, elapsed = _gap_scenario(runtimes, max_delay_s=3.0, max_gap_s=0.3, arrivals=[0.03])
    assert runs == [("rnn", 1), ("rnn", 2)]
    assert elapsed < 1.5, f"the batch waited {elapsed:.2f} s: max_delay 3 s, but no one joined after 0.03 s"


def test_while_company_keeps_coming_a_batch_waits_past_max_gap(runtimes: dict[str, ModelRuntime]) -> None:
    """Arrivals closer together than max_gap keep the batch open (up to max_delay), though together they
    span several gaps."""
    runs, elapsed = _gap_scenario(runtimes, max_delay_s=3.0, max_gap_s=0.2, arrivals=[0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    assert runs == [("rnn", 1), ("rnn", 7)], runs
    assert elapsed < 2.0, elapsed


def test_max_delay_still_caps_a_batch_that_company_keeps_joining_within_max_gap(
    runtimes: dict[str, ModelRuntime],
) -> None:
    """Arrivals every 50 ms with a 200 ms gap would keep the batch open for ever: max_delay (300 ms from the
    head's arrival) ends it, and later arrivals form the next batch."""
    arrivals = [0.05 * step for step in range(1, 13)]  # 50 ms .. 600 ms
    runs, _ = _gap_scenario(runtimes, max_delay_s=0.3, max_gap_s=0.2, arrivals=arrivals)
    assert len(runs) >= 3 and runs[0] == ("rnn", 1), runs  # the lone first, then at least two batches
    assert sum(words for _, words in runs) == 14
    assert runs[1][1] < 13, runs  # the first batch did not wait for every arrival


def test_without_max_gap_a_batch_waits_its_whole_max_delay(runtimes: dict[str, ModelRuntime]) -> None:
    runs, elapsed = _gap_scenario(runtimes, max_delay_s=0.4, max_gap_s=0.0, arrivals=[0.03])
    assert runs == [("rnn", 1), ("rnn", 2)]
    assert elapsed >= 0.39, elapsed


def _fast_predictor() -> RunPredictor:
    predictor = RunPredictor(max_s=1.0)
    predictor.observe(RunPredictor.key(1, 1), 1e-6, inline=True)  # vouches for every small batch
    return predictor


@pytest.mark.parametrize("batching", [True, False], ids=["batcher", "direct"])
def test_a_tiny_request_on_an_idle_model_is_answered_inside_submit(
    runtimes: dict[str, ModelRuntime], batching: bool
) -> None:
    """No future, no callback, no event-loop turn: the coroutine finishes in one step."""
    model = runtimes["lstm"]
    recorder = Recorder()
    predictor = _fast_predictor()
    runner: Batcher | DirectRunner = (
        Batcher(model, batch_settings(), recorder, predictor=predictor) if batching
        else DirectRunner(model, recorder, predictor=predictor)
    )
    words = ["hello", "he"]
    h0 = model.zero_state(2)

    async def scenario() -> RunOutputs:
        runner.start()
        submitted = runner.submit(model.alphabet.indices(words), h0, np.zeros_like(h0))
        try:
            submitted.send(None)  # one step of the coroutine: it must finish without suspending
        except StopIteration as finished:
            outputs, stats = finished.value
            assert stats == RunStats(0.0, stats.inference_s, 2) and stats.inference_s > 0
            return outputs
        finally:
            submitted.close()
            await runner.close()
        raise AssertionError("submit() suspended: the tiny request on an idle model was queued")

    outputs = asyncio.run(scenario())
    alone = model.run(model.alphabet.indices(words), h0, np.zeros_like(h0))
    np.testing.assert_array_equal(outputs.outputs, alone.outputs)
    assert recorder.runs == [("lstm", 2)]


def _answered_inside_submit(batcher: Batcher, model: ModelRuntime, words: list[str]) -> bool:
    """Whether submit() finishes in its first step (the at-once path) rather than suspending on the queue. A
    suspended call is abandoned (closed): its words stay queued and run, unawaited, at close()."""
    h0 = model.zero_state(len(words))
    submitted = batcher.submit(model.alphabet.indices(words), h0, np.zeros_like(h0))
    try:
        submitted.send(None)
    except StopIteration:
        return True
    submitted.close()
    return False


def test_with_a_max_delay_a_tiny_request_on_an_idle_model_is_still_answered_inside_submit(
    runtimes: dict[str, ModelRuntime],
) -> None:
    """An idle model has no company to wait for: max_delay or not, the lone request runs at once."""
    model = runtimes["lstm"]
    recorder = Recorder()
    batcher = Batcher(model, batch_settings(max_delay_s=0.05, max_gap_s=0.01), recorder, predictor=_fast_predictor())

    async def scenario() -> bool:
        batcher.start()
        try:
            return _answered_inside_submit(batcher, model, ["hello"])
        finally:
            await batcher.close()

    assert asyncio.run(scenario()), "submit() suspended: the lone tiny request was queued"
    assert recorder.runs == [("lstm", 1)]


def test_while_a_caller_waits_for_a_queued_batch_an_idle_model_still_takes_the_queue(
    runtimes: dict[str, ModelRuntime],
) -> None:
    """A caller whose batch has run but who has not resumed yet is concurrent traffic: a request arriving then
    (model idle, queue empty) is queued, where it can meet company, instead of being answered at once."""
    model = runtimes["rnn"]
    seen: list[bool] = []

    def observer(name: str, words: int, seconds: float) -> None:
        # Called by the batch's completion before its callers' futures are resolved and their tasks resumed.
        if words == 2 and not seen:
            asyncio.get_running_loop().call_soon(lambda: seen.append(_answered_inside_submit(batcher, model, ["o"])))

    batcher = Batcher(model, batch_settings(max_delay_s=0.05), observer, predictor=_fast_predictor())

    async def scenario() -> None:
        batcher.start()
        # The first runs at once (its slot held until the next turn); the second, from another caller, queues
        # behind it and runs as the 2-word batch the observer waits for.
        await asyncio.gather(start_submit(batcher, model, ["he"]), start_submit(batcher, model, ["lo", "h"]))
        await batcher.close()

    asyncio.run(scenario())
    assert seen == [False], "answered at once while another caller still waited for its queued batch"


def test_for_max_delay_after_evident_concurrency_an_idle_model_queues_then_answers_at_once_again(
    runtimes: dict[str, ModelRuntime],
) -> None:
    """Two callers in one turn make concurrency evident: for max_delay afterwards requests take the queue even
    on an idle model (a burst keeps merging), and once that has passed a lone request is answered at once."""
    model = runtimes["rnn"]
    batcher = Batcher(model, batch_settings(max_delay_s=0.3, max_gap_s=0.01), predictor=_fast_predictor())

    async def scenario() -> list[bool]:
        batcher.start()
        await asyncio.gather(start_submit(batcher, model, ["he"]), start_submit(batcher, model, ["lo"]))
        answered = [_answered_inside_submit(batcher, model, ["o"])]  # idle again, but within max_delay
        await asyncio.sleep(0.35)
        answered.append(_answered_inside_submit(batcher, model, ["o"]))
        await batcher.close()
        return answered

    assert asyncio.run(scenario()) == [False, True]


def test_another_callers_request_in_the_turn_of_a_run_at_once_waits_for_company(
    runtimes: dict[str, ModelRuntime],
) -> None:
    """The held slot exempts only its own caller: another task's request handed over in that turn is evidence
    of concurrent traffic and waits for company (here until the 50 ms gap ends it)."""
    model = runtimes["rnn"]
    batcher = Batcher(model, batch_settings(max_delay_s=0.2, max_gap_s=0.05), predictor=_fast_predictor())

    async def timed(words: list[str]) -> float:
        started = time.perf_counter()
        await batcher.submit(model.alphabet.indices(words), model.zero_state(len(words)), None)
        return time.perf_counter() - started

    async def scenario() -> tuple[float, float]:
        batcher.start()
        first, second = await asyncio.gather(timed(["he"]), timed(["lo"]))
        await batcher.close()
        return first, second

    _, second = asyncio.run(scenario())
    assert second >= 0.04, f"the other caller's request ran after {second * 1000:.1f} ms without waiting for company"


@pytest.mark.parametrize("how", ["cancelled", "failed"])
def test_a_queued_caller_that_gave_up_or_failed_does_not_keep_the_model_off_the_at_once_path(
    runtimes: dict[str, ModelRuntime], how: str
) -> None:
    """Callers waiting for a queued batch keep requests in the queue; one that was cancelled, or whose run
    failed, stops counting, so the idle model answers at once again."""
    model: ModelRuntime = GatedRuntime(runtimes["lstm"].folder) if how == "cancelled" else PoisonedRuntime(
        runtimes["lstm"].folder, "cpu"
    )
    predictor = RunPredictor(max_s=1.0)  # nothing known yet: the first runs go to onnxruntime's thread

    async def scenario() -> bool:
        batcher = Batcher(model, batch_settings(max_delay_s=0.05), predictor=predictor)
        batcher.start()
        if isinstance(model, GatedRuntime):
            first = start_submit(batcher, model, ["hel"])
            await _until(model.entered)
            behind = start_submit(batcher, model, ["lo"])  # queued while the model is busy
            await asyncio.sleep(0.01)
            behind.cancel()
            await asyncio.gather(behind, return_exceptions=True)
            model.gate.set()
            await asyncio.wait_for(first, 30)
        else:
            outcome = await asyncio.gather(start_submit(batcher, model, ["h" * POISON_LENGTH]), return_exceptions=True)
            assert poisoned(outcome[0]), outcome
        predictor.observe(RunPredictor.key(1, 1), 1e-6, inline=True)  # from now on, small runs are tiny
        await asyncio.sleep(0.06)  # past max_delay: the concurrency that queued requests is no longer evident
        try:
            return _answered_inside_submit(batcher, model, ["o"])
        finally:
            await batcher.close()

    try:
        assert asyncio.run(scenario()), f"a {how} caller still counted as waiting: the idle model queued the request"
    finally:
        if isinstance(model, GatedRuntime):
            model.gate.set()


def test_with_a_max_delay_requests_of_other_callers_in_a_run_at_once_turn_wait_and_ride_together(
    runtimes: dict[str, ModelRuntime],
) -> None:
    """Other callers' requests handed over in the turn of a run done at once are company: with a max_delay they
    queue behind its held slot, wait, and ride one run (the same caller's next request does not wait:
    test_a_lone_request_does_not_wait_for_max_delay)."""
    model = runtimes["rnn"]
    recorder = Recorder()
    batcher = Batcher(model, batch_settings(max_delay_s=5.0, max_gap_s=0.05), recorder, predictor=_fast_predictor())

    async def scenario() -> float:
        batcher.start()
        started = time.perf_counter()
        await asyncio.gather(*(start_submit(batcher, model, ["hel", "lo"]) for _ in range(4)))
        took = time.perf_counter() - started
        await batcher.close()
        return took

    took = asyncio.run(scenario())
    assert recorder.runs == [("rnn", 2), ("rnn", 6)]
    assert took < 2.0, f"the batch waited {took:.2f} s: the gap (50 ms) should have ended its wait"


def test_requests_handed_over_in_the_same_turn_as_a_run_at_once_ride_the_next_run_together(
    runtimes: dict[str, ModelRuntime],
) -> None:
    """An asyncio client or a stream delivers several requests in one loop turn: the first is answered at once,
    the rest queue behind its still-taken slot and share one run in the next iteration."""
    model = runtimes["rnn"]
    recorder = Recorder()
    batcher = Batcher(model, batch_settings(), recorder, predictor=_fast_predictor())

    async def scenario() -> None:
        batcher.start()
        await asyncio.gather(*(start_submit(batcher, model, ["hel", "lo"]) for _ in range(8)))
        await start_submit(batcher, model, ["o"])  # alone afterwards: at once
        await batcher.close()

    asyncio.run(scenario())
    assert recorder.runs == [("rnn", 2), ("rnn", 14), ("rnn", 1)]


def test_requests_arriving_while_the_model_is_busy_still_queue_and_merge(runtimes: dict[str, ModelRuntime]) -> None:
    """The at-once path is for an idle model only: behind a run in flight, tiny requests wait and ride together."""
    model = GatedRuntime(runtimes["rnn"].folder)
    recorder = Recorder()
    predictor = RunPredictor(max_s=1.0)  # nothing known yet: the first run goes to the (gated) thread
    batcher = Batcher(model, batch_settings(), recorder, predictor=predictor)

    async def scenario() -> None:
        batcher.start()
        first = start_submit(batcher, model, ["hel"])
        await _until(model.entered)
        predictor.observe(RunPredictor.key(1, 1), 1e-6, inline=True)  # from now on, small runs are tiny
        rest = [start_submit(batcher, model, ["he", "lo"]) for _ in range(4)]
        await asyncio.sleep(0.01)
        assert batcher.queued_words == 8
        model.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 30)
        await start_submit(batcher, model, ["o"])  # idle again: at once
        await batcher.close()

    try:
        asyncio.run(scenario())
    finally:
        model.gate.set()
    assert recorder.runs == [("rnn", 1), ("rnn", 8), ("rnn", 1)]


class ThreadRecordingRuntime(ModelRuntime):
    """The real runtime, noting the thread each started run finishes on (onnxruntime calls back on the thread
    that ran it)."""

    threads: list[int]

    def start_run(
        self, encoded: WordIndices, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None, done: RunDone
    ) -> None:
        def noted(outputs: RunOutputs | None, error: BaseException | None) -> None:
            self.threads.append(threading.get_ident())
            done(outputs, error)

        super().start_run(encoded, h0, c0, noted)


@pytest.mark.parametrize("batching", [True, False], ids=["batcher", "direct"])
def test_onnxruntime_runs_off_the_event_loop(runtimes: dict[str, ModelRuntime], batching: bool) -> None:
    model = ThreadRecordingRuntime(runtimes["lstm"].folder, "cpu")
    model.threads = []
    runner: Batcher | DirectRunner = (
        Batcher(model, batch_settings(max_batch_words=100)) if batching else DirectRunner(model)
    )

    async def scenario() -> int:
        runner.start()
        for words in (["hello"], ["hello"], ["he", "lo"]):
            h0 = model.zero_state(len(words))
            outputs, _ = await runner.submit(model.alphabet.indices(words), h0, np.zeros_like(h0))
            direct = model.run(model.alphabet.indices(words), h0, np.zeros_like(h0))  # not a started run: not noted
            np.testing.assert_array_equal(outputs.outputs, direct.outputs)
        await runner.close()
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert len(model.threads) == 3
    assert loop_thread not in model.threads, "an onnxruntime run happened on the event loop's thread"
