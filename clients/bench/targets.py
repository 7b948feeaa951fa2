"""The targets, as ratios computed from one run's own cells, and the best ratio this machine allows for each.

Every target compares two cells of the same run (our server against the echo, batching on against off, the
server against the in-process limit), measured Plan.target_repeats times; the median ratio counts. A ceiling
(see CEILINGS in report.py) bounds a ratio from figures of the same run: the echo's round trip plus our
handler's own time, or the echo's CPU per request plus our handler's, when the echo run kept every core busy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clients.bench.plan import LARGE_MODEL, MAIN_MODEL, Cell, Report


def _find(report: Report, **match: Any) -> Cell | None:
    """The first cell whose fields have these values."""
    for cell in report.cells:
        if all(getattr(cell, key) == value for key, value in match.items()):
            return cell
    return None


def _inprocess(report: Report, model: str, batch: int) -> float | None:
    """The in-process words/s of a model at a batch size, if measured."""
    for row in report.inprocess:
        if row["model"] == model and row["batch_words"] == batch:
            return float(row["words_per_s"])
    return None


@dataclass(frozen=True, slots=True)
class Check:
    """One target: what was compared, the ratio, the goal."""

    name: str
    detail: str
    ratio: float | None
    goal: str
    passed: bool | None
    bound: float | None = None
    """The best ratio this machine allows, from this run's own figures (see CEILINGS), where one applies."""
    bound_detail: str = ""


def evaluate(report: Report) -> list[Check]:
    """The targets, as ratios from this run."""
    checks: list[Check] = []
    on = {"target": "server", "model": MAIN_MODEL, "batching": True, "rpc": "unary"}

    def add(name: str, detail: str, ratio: float | None, goal: str, ok: Any,
            bound: tuple[float, str] | None = None) -> None:
        valid = ratio is not None and math.isfinite(ratio)
        checks.append(Check(name, detail, ratio if valid else None, goal, bool(ok(ratio)) if valid else None,
                            *(bound or (None, ""))))

    cores = int(report.machine.get("affinity") or os.cpu_count() or 1)

    def echo_of(concurrency: int, words: int) -> dict[str, Any]:
        return {"target": "echo", "rpc": "unary", "concurrency": concurrency, "words": words}

    pairs = _pairs(report, {**on, "concurrency": 1, "words": 1}, echo_of(1, 1))
    if pairs:
        (server, echo), ratio, ratios = _median(pairs, lambda a, b: a.result["latency_ms"]["p50"] / b.result["latency_ms"]["p50"])
        s, e = server.result["latency_ms"]["p50"], echo.result["latency_ms"]["p50"]
        add("1 word, concurrency 1: latency", f"server p50 {s:.3f} ms / echo p50 {e:.3f} ms{_spread(ratios)}", ratio,
            "<= 1.5", lambda r: r <= 1.5, _latency_floor(report, e))
    pairs = _pairs(report, {**on, "concurrency": 64, "words": 1}, echo_of(64, 1))
    if pairs:
        (server, echo), ratio, ratios = _median(pairs, lambda a, b: a.result["words_per_s"] / b.result["requests_per_s"])
        s, e = server.result["words_per_s"], echo.result["requests_per_s"]
        add("1 word, concurrency 64: throughput", f"server {s:,.0f} words/s / echo {e:,.0f} req/s{_spread(ratios)}",
            ratio, ">= 0.9", lambda r: r >= 0.9, _cpu_ceiling(report, pairs[0][1], 64, 1, cores))
    pairs = _pairs(report, {**on, "concurrency": 64, "words": 32}, echo_of(64, 32))
    if pairs:
        (server, echo), ratio, ratios = _median(pairs, lambda a, b: a.result["words_per_s"] / b.result["words_per_s"])
        s, e = server.result["words_per_s"], echo.result["words_per_s"]
        add("32 words, concurrency 64: throughput", f"server {s:,.0f} words/s / echo {e:,.0f} words/s "
            f"({echo.result['response_bytes']:,} B responses){_spread(ratios)}", ratio, ">= 0.8", lambda r: r >= 0.8,
            _cpu_ceiling(report, pairs[0][1], 64, 32, cores))
    limit = _inprocess(report, MAIN_MODEL, 1024)
    candidates = [
        cell for cell in report.cells
        if cell.target == "server" and cell.model == MAIN_MODEL and cell.batching and cell.concurrency == 8
        and cell.words == 1024
    ]
    if candidates and limit:
        best = max(candidates, key=lambda cell: cell.result["words_per_s"])
        s = best.result["words_per_s"]
        add("1024 words, concurrency 8: vs in-process", f"server ({best.rpc}) {s:,.0f} words/s / in-process batch "
            f"1024 {limit:,.0f} words/s", s / limit, ">= 0.6", lambda r: r >= 0.6)
    large = {"target": "server", "model": LARGE_MODEL, "rpc": "unary", "concurrency": 64, "words": 1}
    pairs = _pairs(report, {**large, "batching": True}, {**large, "batching": False})
    if pairs:
        (large_on, large_off), ratio, ratios = _median(
            pairs, lambda a, b: a.result["words_per_s"] / b.result["words_per_s"] if b.result["words_per_s"] else math.nan
        )
        a, b = large_on.result["words_per_s"], large_off.result["words_per_s"]
        small = sorted(cell.result["words_per_s"] for cell in report.cells if _matches(cell, {**on, "concurrency": 64, "words": 1}))
        bound = None
        if small and b:
            fastest = small[len(small) // 2]
            bound = (fastest / b, f"{MAIN_MODEL} (compute next to nothing) batching on {fastest:,.0f} words/s / "
                                  f"{LARGE_MODEL} off {b:,.0f}")
        add("large model, 1 word, concurrency 64: batching", f"on {a:,.0f} / off {b:,.0f} words/s{_spread(ratios)}",
            ratio, ">= 2", lambda r: r >= 2, bound)
    memory = report.memory.get("batching on")
    if memory:
        add("idle RSS", f"{memory['idle_mib']:.0f} MiB", memory["idle_mib"] / 150, "<= 1 (150 MiB)", lambda r: r <= 1)
        add("RSS under load / idle", f"peak {memory['peak_main_mib']:.0f} MiB on {MAIN_MODEL} "
            f"/ idle {memory['idle_mib']:.0f} MiB", memory["peak_main_mib"] / memory["idle_mib"], "<= 1.5",
            lambda r: r <= 1.5)
    return checks


def _matches(cell: Cell, match: dict[str, Any]) -> bool:
    return all(getattr(cell, key) == value for key, value in match.items())


def _pairs(report: Report, first: dict[str, Any], second: dict[str, Any]) -> list[tuple[Cell, Cell]]:
    """The (first, second) cells measured in each repeat, in repeat order."""
    pairs = []
    for repeat in sorted({cell.repeat for cell in report.cells}):
        a = _find(report, repeat=repeat, **first)
        b = _find(report, repeat=repeat, **second)
        if a is not None and b is not None:
            pairs.append((a, b))
    return pairs


def _median(
    pairs: list[tuple[Cell, Cell]], ratio: Callable[[Cell, Cell], float]
) -> tuple[tuple[Cell, Cell], float, list[float]]:
    """The pair whose ratio is the median (the lower middle for an even count), that ratio, and every ratio."""
    ratios = [ratio(a, b) for a, b in pairs]
    middle = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]
    return pairs[middle], ratios[middle], ratios


def _spread(ratios: list[float]) -> str:
    if len(ratios) < 2:
        return ""
    return f"; median of {len(ratios)} repeats: {', '.join(f'{r:.2f}' for r in ratios)}"


def _handler_row(report: Report, concurrency: int, words: int, idle: bool = False) -> dict[str, Any] | None:
    """The handler measured without gRPC at this shape: back to back, or (idle) after an idle gap."""
    for row in report.handler:
        if row["concurrency"] == concurrency and row["words"] == words and bool(row.get("idle_gap_ms")) == idle:
            return row
    return None


def _latency_floor(report: Report, echo_p50_ms: float) -> tuple[float, str] | None:
    """Lowest latency ratio possible: the echo's round trip plus our handler's own time without gRPC."""
    # A lone client's request finds the process idle, its caches cold: the row with an idle gap, where measured.
    row = _handler_row(report, 1, 1, idle=True)
    what = "handler alone after an idle gap"
    if row is None:
        row, what = _handler_row(report, 1, 1), "handler alone"
    if row is None:
        return None
    handler_ms = row["wall_us_per_request"] / 1000
    return (echo_p50_ms + handler_ms) / echo_p50_ms, (
        f"(echo p50 {echo_p50_ms:.3f} + {what} {handler_ms:.3f} ms) / echo p50")


def _cpu_ceiling(report: Report, echo: Cell, concurrency: int, words: int, cores: int) -> tuple[float, str] | None:
    """Highest throughput ratio possible when the echo run already kept every core busy: the echo's CPU per
    request (its server + the load generator) plus our handler's own CPU without gRPC, against the echo's."""
    row = _handler_row(report, concurrency, words)
    if row is None or echo.server_cpu_us is None or echo.client_cpu_us is None:
        return None
    echo_us = echo.server_cpu_us + echo.client_cpu_us
    busy = echo_us * echo.result["requests_per_s"] / 1e6 / cores
    if busy < 0.85:
        return None  # the echo run left CPU idle: CPU is not what bounds it
    handler_us = row["cpu_us_per_request"]
    return echo_us / (echo_us + handler_us), (
        f"echo {echo_us:.0f} us CPU/request (cores {busy:.0%} busy) / (echo + handler alone {handler_us:.0f} us)")
