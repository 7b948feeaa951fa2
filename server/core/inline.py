"""Inline runs: a run predicted to be tiny runs on the event loop itself instead of onnxruntime's thread.

Handing a run to onnxruntime's own thread (session.run_async) and getting the result back costs a thread
wake-up each way, 0.1-0.25 ms on an idle 2-core VM and 0.6-1.8 ms with both cores busy, where a one-word run
of a small model computes in about 25 us (80-140 us inline on busy cores): for such runs the hand-off is many
times the work. RunPredictor keeps, per runner (one per loaded model
version), moving averages of run time by batch size, bucketed by the one-hot batch's cells (words x longest
word, to a power of two), and decides each run's path:

- inline, when the bucket's average over inline runs is at most `max_s` (--inline-max-us);
- inline too, for a bucket with no inline runs yet, when a smaller bucket's inline average, doubled for every
  bucket between them (each holds twice the cells; run time grows less than that), is at most `max_s`: a
  new batch size (merged batches come in many) is measured inline at once, instead of first paying the
  thread path, whose times on a busy machine (ms of hand-off) could keep it off the loop for good;
- an inline *probe*, once every PROBE_EVERY runs of a bucket whose average (either path) is at most
  PROBE_MAX_S: a bucket known only through the thread path (whose times include the hand-off) gets a
  measurement of the compute alone. A probe blocks the loop about as long as the bucket's runs take, so at
  most about PROBE_MAX_S;
- onnxruntime's thread otherwise: the first run of a model, a bucket no smaller bucket vouches for, and
  every bucket whose runs are slower than that. So a run that could block the loop for long never runs
  inline, and a model that becomes slow (a loaded machine, a new version) goes back to the thread by itself.

Averages are exponential moving averages of wall time, each run clipped to CLIP times the average first: a
run stretched by preemption (the loop's thread descheduled mid-run, milliseconds on a busy machine, which
would have stalled the loop whatever it was doing) moves the average by at most 30 %, where unclipped one
such run sent a 50 us bucket to the thread for hundreds of runs; a model that really slowed down still
lifts it 30 % per run.

Inline runs are timed like the others and keep the averages current. The outcome of a queued batch's inline
run is still delivered with loop.call_soon, so its callers see the same order of events on both paths; a
request run at once (server/core/batcher.py: an idle model, a run predicts_inline() vouches for) gets its
outputs straight back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBE_MAX_S = 0.001
"""Buckets averaging more than this (on either path) are never probed inline."""
PROBE_EVERY = 64
"""A probe-eligible bucket not inline yet runs inline once every this many of its runs."""
SMOOTHING = 0.1
"""Weight of the newest run in a bucket's moving averages."""
CLIP = 4.0
"""A run counts at most this many times the bucket's average (see the module doc)."""


@dataclass(slots=True)
class _Bucket:
    inline_s: float | None = None
    thread_s: float | None = None
    runs_since_probe: int = 0


@dataclass(slots=True)
class RunPredictor:
    """Per-runner moving averages of run time by batch size, and the inline-or-thread decision (module doc)."""

    max_s: float
    """A bucket whose inline runs average at most this runs inline."""
    _buckets: dict[int, _Bucket] = field(default_factory=dict)

    @staticmethod
    def key(words: int, max_len: int) -> int:
        """The bucket of a batch: its one-hot cells (words x longest word), to a power of two."""
        return (words * max_len).bit_length()

    def runs_inline(self, key: int) -> bool:
        """Whether the next run of this bucket should run on the event loop."""
        if self.predicts_inline(key):
            return True
        bucket = self._buckets.setdefault(key, _Bucket())
        known = [s for s in (bucket.inline_s, bucket.thread_s) if s is not None]
        if not known or min(known) > PROBE_MAX_S:  # never seen and not vouched for, or slow
            return False
        bucket.runs_since_probe += 1
        if bucket.runs_since_probe >= PROBE_EVERY or bucket.inline_s is None:
            bucket.runs_since_probe = 0
            return True
        return False

    def predicts_inline(self, key: int) -> bool:
        """Whether this bucket's runs are known or vouched for to be tiny (no probing, no side effects)."""
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.inline_s is not None:
            return bucket.inline_s <= self.max_s
        return self._vouched_for(key)

    def _vouched_for(self, key: int) -> bool:
        """Whether the nearest smaller bucket with inline runs predicts this one within max_s (module doc)."""
        for smaller in range(key - 1, -1, -1):
            known = self._buckets.get(smaller)
            if known is not None and known.inline_s is not None:
                return known.inline_s * (1 << (key - smaller)) <= self.max_s
        return False

    def observe(self, key: int, seconds: float, inline: bool) -> None:
        """Record one run of the bucket (inline: on the loop, else on onnxruntime's thread)."""
        bucket = self._buckets.setdefault(key, _Bucket())
        if inline:
            bucket.inline_s = _averaged(bucket.inline_s, seconds)
        else:
            bucket.thread_s = _averaged(bucket.thread_s, seconds)

    def averages(self) -> dict[int, tuple[float | None, float | None]]:
        """(inline, thread) average seconds per bucket, for tests and diagnostics."""
        return {key: (bucket.inline_s, bucket.thread_s) for key, bucket in self._buckets.items()}


def _averaged(average: float | None, seconds: float) -> float:
    """The moving average with one more run, clipped to CLIP times the average (module doc)."""
    if average is None:
        return seconds
    return average + SMOOTHING * (min(seconds, CLIP * average) - average)
