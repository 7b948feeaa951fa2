"""charrnn-batch's progress on stderr: a tqdm bar on a terminal, periodic plain lines otherwise, or nothing.

Warnings (a stream failing, answering again) go through note(), so that they never garble the bar.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from tqdm import tqdm

PROG = "charrnn-batch"
"""The name every line on stderr starts with."""


class Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise, or nothing (--quiet); always the summary."""

    def __init__(self, total: int | None, done: int, failed: int, mode: str, interval: float) -> None:
        self.total = total
        self.initial = done
        self.done = done
        self.failed = failed
        self.mode = mode
        self.interval = interval
        self.started = time.monotonic()
        self.bar: tqdm[Any] | None = None
        if mode == "bar":
            self.bar = tqdm(
                total=total, initial=done, unit="word", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                smoothing=0.1, desc=PROG,
            )

    @property
    def rate(self) -> float:
        """Words per second in this run."""
        elapsed = time.monotonic() - self.started
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def advance(self, words: int, failed: int) -> None:
        """Count a written chunk."""
        self.done += words
        self.failed += failed
        if self.bar is not None:
            self.bar.update(words)
            if failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)

    def note(self, message: str) -> None:
        """A warning line that does not garble the bar."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(f"{PROG}: {message}", file=sys.stderr)
        else:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    def line(self) -> str:
        """One status line: words done (of total), rate, failures, ETA."""
        of = f"/{self.total:,} ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        text = f"{self.done:,}{of} words, {self.rate:,.0f} words/s, {self.failed:,} failed"
        if self.total and self.rate > 0 and self.total > self.done:
            text += f", ETA {(self.total - self.done) / self.rate:,.0f} s"
        return text

    async def tick(self) -> None:
        """Print a status line every interval (when stderr is not a terminal)."""
        while True:
            await asyncio.sleep(self.interval)
            print(f"{PROG}: {self.line()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
