"""What one benchmark run measures (Plan: FULL, or QUICK for a smoke run) and the records it fills in.

A Cell is one load measurement (a server or the echo, at one concurrency and request size); a Report holds
every measurement of a run, from which the targets are evaluated and the markdown rendered. TARGET_PAIRS
names the cells the targets compare, which a full run measures again (Plan.target_repeats).
"""

from __future__ import annotations

import string
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MAIN_MODEL = "lstm"
LARGE_MODEL = "large_lstm"
LARGE_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + "0123-"  # 57 letters
LARGE_HIDDEN = 256
LARGE_LAYERS = 2
WORD_LENGTH = 8
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures, and for how long."""

    duration_s: float
    warmup_s: float
    inprocess_s: float
    batches: tuple[int, ...]
    main_cells: tuple[tuple[int, int], ...]
    """(concurrency, words per request) for the main model."""
    large_cells: tuple[tuple[int, int], ...]
    stream: bool = True
    long_duration_s: float = 0.0
    """Duration for cells whose requests take long (1024 words on the large model)."""
    target_repeats: int = 1
    """Times each pair of cells a target compares is measured (the targets take the median ratio)."""


FULL = Plan(
    duration_s=3.0,
    warmup_s=0.7,
    inprocess_s=1.0,
    batches=(1, 32, 1024),
    main_cells=tuple((c, w) for w in (1, 32, 1024) for c in (1, 8, 64)),
    large_cells=((1, 1), (8, 1), (64, 1), (1, 32), (8, 32), (64, 32), (1, 1024), (8, 1024)),
    long_duration_s=6.0,
    target_repeats=3,
)
QUICK = Plan(
    duration_s=0.8,
    warmup_s=0.3,
    inprocess_s=0.3,
    batches=(1, 32, 1024),
    main_cells=((1, 1), (64, 1), (64, 32), (8, 1024)),
    large_cells=((64, 1),),
    long_duration_s=2.0,
)


@dataclass(slots=True)
class Cell:
    """One load measurement."""

    target: str  # "echo", "server"
    model: str
    rpc: str  # "unary", "stream"
    batching: bool | None
    concurrency: int
    words: int
    result: dict[str, Any]
    avg_batch_words: float | None = None
    peak_rss_mib: float | None = None
    server_cpu_us: float | None = None
    """CPU time of the serving process (all its threads) per request sent, warm-up included."""
    client_cpu_us: float | None = None
    """CPU time of the load generator per request sent (this process and its load processes)."""
    repeat: int = 0
    """0 for the main tables; 1, 2... for the repeated measurements of the targets' cells."""


@dataclass(slots=True)
class Report:
    """Everything the markdown is written from (also dumped as JSON with --json)."""

    command: str
    started_utc: str
    machine: dict[str, Any]
    plan: dict[str, Any]
    server_flags: list[str]
    providers: dict[str, str] = field(default_factory=dict)
    inprocess: list[dict[str, Any]] = field(default_factory=list)
    handler: list[dict[str, Any]] = field(default_factory=list)
    tuning: list[dict[str, Any]] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    elapsed_s: float = 0.0


def log(message: str) -> None:
    """Progress, to stderr."""
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


TARGET_PAIRS = (
    ("server", MAIN_MODEL, 1, 1), ("server", MAIN_MODEL, 64, 1), ("server", MAIN_MODEL, 64, 32),
    ("batching", LARGE_MODEL, 64, 1),
)
"""The cells each target compares: our server (batching on) against the echo, or batching on against off."""
