"""Inline runs (server/core/inline.py): the prediction's decisions, and both paths giving the same answers.

Unit: torch-free models (tests/onnx_models.py), real onnxruntime sessions, the real batcher and engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from server.core import inline
from server.core.batcher import Batcher, DirectRunner
from server.core.engine import Engine, Limits, WordEncoding
from server.core.inline import RunPredictor
from server.core.runtime import ModelRuntime, RunOutputs, load_repository
from tests.test_batcher import batch_settings, encode_all, random_traffic

pytestmark = pytest.mark.unit

LIMITS = Limits(max_words=4096, max_word_length=256)


@pytest.fixture(scope="module")
def runtimes(unit_repository: Path) -> dict[str, ModelRuntime]:
    return load_repository(unit_repository, "cpu")


def test_an_unseen_bucket_runs_on_the_thread_then_a_fast_one_is_probed_and_goes_inline() -> None:
    predictor = RunPredictor(max_s=100e-6)
    key = RunPredictor.key(1, 5)
    assert predictor.runs_inline(key) is False  # never seen: the thread
    predictor.observe(key, 250e-6, inline=False)  # the thread's time includes the hand-off
    assert predictor.runs_inline(key) is True  # a probe: fast enough to measure inline
    predictor.observe(key, 20e-6, inline=True)
    assert all(predictor.runs_inline(key) for _ in range(100))


def test_a_slow_bucket_is_never_run_inline() -> None:
    predictor = RunPredictor(max_s=100e-6)
    key = RunPredictor.key(1024, 64)
    assert predictor.runs_inline(key) is False
    predictor.observe(key, 5e-3, inline=False)  # over PROBE_MAX_S: not even probed
    assert not any(predictor.runs_inline(key) for _ in range(10 * inline.PROBE_EVERY))


def test_a_bucket_that_slows_down_goes_back_to_the_thread_and_is_probed_rarely() -> None:
    predictor = RunPredictor(max_s=100e-6)
    key = RunPredictor.key(8, 8)
    predictor.runs_inline(key)
    predictor.observe(key, 50e-6, inline=True)
    assert predictor.runs_inline(key)
    for _ in range(40):  # the machine got busy: inline runs now take 0.5 ms
        predictor.observe(key, 500e-6, inline=True)
    decisions = [predictor.runs_inline(key) for _ in range(4 * inline.PROBE_EVERY)]
    assert sum(decisions) == 4  # one probe per PROBE_EVERY runs
    assert RunPredictor.key(8, 8) != RunPredictor.key(64, 8) and RunPredictor.key(2, 4) == RunPredictor.key(1, 8)


def test_a_new_batch_size_is_vouched_for_by_a_smaller_one_within_the_limit() -> None:
    predictor = RunPredictor(max_s=500e-6)
    small = RunPredictor.key(1, 5)
    predictor.observe(small, 50e-6, inline=True)
    # Twice the cells per bucket: two buckets up, at most 4 x 50 us, is within 500 us; four up (800 us) is not.
    assert predictor.predicts_inline(small + 2) and predictor.runs_inline(small + 2)
    assert not predictor.predicts_inline(small + 4) and not predictor.runs_inline(small + 4)
    # A bucket's own inline runs outrank the estimate: measured slow, it leaves the loop.
    predictor.observe(small + 2, 900e-6, inline=True)
    assert not predictor.predicts_inline(small + 2)


def test_one_stalled_run_does_not_send_a_fast_bucket_to_the_thread() -> None:
    predictor = RunPredictor(max_s=100e-6)
    key = RunPredictor.key(1, 5)
    predictor.observe(key, 50e-6, inline=True)
    predictor.observe(key, 20e-3, inline=True)  # preempted mid-run: 400 times the usual
    inline_s, _ = predictor.averages()[key]
    assert inline_s is not None and inline_s <= 50e-6 * (1 + inline.SMOOTHING * (inline.CLIP - 1)) + 1e-12
    assert predictor.runs_inline(key)
    for _ in range(10):  # ... but a model that really is that slow now still leaves the loop within a few runs
        predictor.observe(key, 20e-3, inline=True)
    assert not predictor.predicts_inline(key)


def test_the_warm_up_run_seeds_each_runner_so_the_first_small_request_runs_inline(
    runtimes: dict[str, ModelRuntime],
) -> None:
    model = runtimes["rnn"]
    assert model.warm_up_seconds is not None and 0 < model.warm_up_seconds < 0.1
    engine = Engine({"rnn": model}, LIMITS, None, inline_max_s=1.0)
    predictor = engine._defaults["rnn"].runner._predictor  # noqa: SLF001 - the runner's own predictor
    assert predictor is not None and predictor.predicts_inline(RunPredictor.key(2, 5))


class Counting:
    """Counts which path each run of a ModelRuntime took (run() on the loop thread, start_run() on onnxruntime's)."""

    def __init__(self, model: ModelRuntime) -> None:
        self.model, self.inline, self.threaded = model, 0, 0
        self.loop_thread = threading.get_ident()

    def install(self) -> None:
        run, start_run = self.model.run, self.model.start_run

        def counted_run(*args):  # type: ignore[no-untyped-def]
            assert threading.get_ident() == self.loop_thread
            self.inline += 1
            return run(*args)

        def counted_start_run(*args):  # type: ignore[no-untyped-def]
            self.threaded += 1
            return start_run(*args)

        self.model.run, self.model.start_run = counted_run, counted_start_run  # type: ignore[method-assign]

    def uninstall(self) -> None:
        del self.model.run, self.model.start_run  # type: ignore[attr-defined]


def results(engine: Engine, requests: Sequence[object]) -> list[list[object]]:
    return [list(result.words) for result in asyncio.run(encode_all(engine, requests))]  # type: ignore[arg-type]


@pytest.mark.parametrize("batching", [True, False])
def test_inline_and_threaded_runs_give_the_same_answers(runtimes: dict[str, ModelRuntime], batching: bool) -> None:
    requests = random_traffic(runtimes, 5, count=120) * 3  # repeats: buckets get seen, probed, then inlined
    settings = batch_settings(max_batch_words=16) if batching else None
    counters = {name: Counting(model) for name, model in runtimes.items()}
    for counter in counters.values():
        counter.install()
    try:
        inlined = results(Engine(runtimes, LIMITS, settings, inline_max_s=1e-3), requests)
        threaded_before = sum(c.threaded for c in counters.values())
        inline_runs = sum(c.inline for c in counters.values())
        threaded = results(Engine(runtimes, LIMITS, settings), requests)
    finally:
        for counter in counters.values():
            counter.uninstall()
    assert inline_runs > 0 and threaded_before > 0, "both paths must have been taken"
    assert sum(c.inline for c in counters.values()) == inline_runs, "without inline_max_s nothing runs inline"
    for a_words, b_words in zip(inlined, threaded, strict=True):
        for a, b in zip(a_words, b_words, strict=True):
            assert isinstance(a, WordEncoding) and isinstance(b, WordEncoding)
            np.testing.assert_array_equal(a.outputs, b.outputs)
            np.testing.assert_array_equal(a.hidden, b.hidden)
            if a.cell is not None or b.cell is not None:
                np.testing.assert_array_equal(a.cell, b.cell)


def test_an_inline_outcome_is_delivered_after_submit_returns_control(runtimes: dict[str, ModelRuntime]) -> None:
    """The batcher's bookkeeping (its run count) must see the run start before it finishes, as on the thread."""
    model = runtimes["rnn"]

    async def scenario() -> tuple[int, int]:
        predictor = RunPredictor(max_s=1.0)
        batcher, direct = Batcher(model, batch_settings(), predictor=predictor), DirectRunner(model, predictor=predictor)
        batcher.start()
        direct.start()
        letters = model.alphabet.indices(["hello"])
        for _ in range(3):  # seen, probed, inline
            for runner in (batcher, direct):
                h0 = model.zero_state(1)
                outputs, _stats = await runner.submit(letters, h0, None)
                assert isinstance(outputs, RunOutputs) and outputs.outputs.shape[0] == 1
        await batcher.close()
        await direct.close()
        inline_s, thread_s = predictor.averages()[RunPredictor.key(1, 5)]
        return int(inline_s is not None), int(thread_s is not None)

    assert asyncio.run(scenario()) == (1, 1)
