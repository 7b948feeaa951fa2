"""clients/bench: the ratios, the estimated bounds and the report are computed from the run's figures.

The benchmark itself is a script that measures (docs/performance.md); these tests check its arithmetic on
figures given here (unit), and run the handler measurement (real Engine, real onnxruntime, no gRPC) briefly
on the exported repository (e2e).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from clients.bench.inprocess import measure_handler, measure_inprocess
from clients.bench.plan import LARGE_MODEL, MAIN_MODEL, QUICK, Cell, Report
from clients.bench.report import render
from clients.bench.targets import evaluate
from server.config import ServerConfig


def result(requests_per_s: float, words: int, p50_ms: float, response_bytes: int = 100) -> dict[str, Any]:
    return {
        "requests_per_s": requests_per_s, "words_per_s": requests_per_s * words, "response_bytes": response_bytes,
        "latency_ms": {"p50": p50_ms, "p90": p50_ms * 1.5, "p99": p50_ms * 2}, "errors": {},
    }


def server(model: str, batching: bool, concurrency: int, words: int, rate: float, p50: float = 1.0) -> Cell:
    return Cell("server", model, "unary", batching, concurrency, words, result(rate, words, p50),
                server_cpu_us=300.0, client_cpu_us=200.0)


def echo(concurrency: int, words: int, rate: float, p50: float, server_cpu: float, client_cpu: float) -> Cell:
    return Cell("echo", MAIN_MODEL, "unary", None, concurrency, words, result(rate, words, p50),
                server_cpu_us=server_cpu, client_cpu_us=client_cpu)


def report_with(cells: list[Cell], handler: list[dict[str, Any]], cores: int = 2) -> Report:
    return Report(
        command="python -m clients.bench.benchmark", started_utc="2026-11-29 10:00",
        machine={"nproc": cores, "affinity": cores, "cpu_model": "test", "memory_gib": 1, "gpu": "none",
                 "load_average_at_start": [0, 0, 0], "python": "3.11", "onnxruntime": "x",
                 "onnxruntime_providers_available": ["CPUExecutionProvider"], "grpcio": "x", "numpy": "x",
                 "platform": "linux"},
        plan={"duration_s": 1, "warmup_s": 0, "long_duration_s": 1}, server_flags=["--max-queue-delay-ms", "5"],
        inprocess=[{"model": MAIN_MODEL, "provider": "CPUExecutionProvider", "batch_words": 1024, "runs": 1,
                    "ms_per_run": 4.0, "words_per_s": 250_000.0}],
        handler=handler, cells=cells,
        memory={"batching on": {"idle_mib": 100.0, "peak_main_mib": 120.0, "peak_large_mib": 130.0,
                                "peak_mib": 130.0, "hwm_mib": 131.0}},
    )


HANDLER = [
    {"model": MAIN_MODEL, "concurrency": 1, "words": 1, "requests": 100, "requests_per_s": 3000.0,
     "wall_us_per_request": 300.0, "cpu_us_per_request": 290.0},
    {"model": MAIN_MODEL, "concurrency": 64, "words": 1, "requests": 100, "requests_per_s": 20000.0,
     "wall_us_per_request": 3000.0, "cpu_us_per_request": 50.0},
    {"model": MAIN_MODEL, "concurrency": 64, "words": 32, "requests": 100, "requests_per_s": 5000.0,
     "wall_us_per_request": 10000.0, "cpu_us_per_request": 250.0},
]


def checks_by_name(report: Report) -> dict[str, Any]:
    return {check.name.split(":")[0]: check for check in evaluate(report)}


@pytest.mark.unit
def test_the_latency_bound_takes_the_handler_after_an_idle_gap_where_measured() -> None:
    """A lone client's request finds the process idle: the handler's time then, not back to back, bounds it;
    and the back-to-back rows (not the idle ones) still bound the throughput ratios."""
    idle = [
        {"model": MAIN_MODEL, "concurrency": 1, "words": 1, "requests": 100, "requests_per_s": 900.0,
         "wall_us_per_request": 450.0, "cpu_us_per_request": 400.0, "idle_gap_ms": 0.5, "idle_cpu_us": 40.0},
        {"model": MAIN_MODEL, "concurrency": 1, "words": 32, "requests": 100, "requests_per_s": 800.0,
         "wall_us_per_request": 600.0, "cpu_us_per_request": 550.0, "idle_gap_ms": 0.5, "idle_cpu_us": 40.0},
    ]
    cells = [server(MAIN_MODEL, True, 1, 1, 1000, p50=0.84), echo(1, 1, 1600, 0.6, 300, 250),
             server(MAIN_MODEL, True, 64, 1, 3000), echo(64, 1, 4000, 15.0, 250, 200)]
    checks = checks_by_name(report_with(cells, HANDLER + idle))
    latency = checks["1 word, concurrency 1"]
    assert latency.bound == pytest.approx((0.6 + 0.45) / 0.6)
    assert "after an idle gap 0.450 ms" in latency.bound_detail
    assert checks["1 word, concurrency 64"].bound == pytest.approx(450 / (450 + 50))


@pytest.mark.unit
def test_ratios_and_bounds_come_from_the_cells() -> None:
    cells = [
        server(MAIN_MODEL, True, 1, 1, 1000, p50=0.84),
        echo(1, 1, 1600, 0.6, 300, 250),
        server(MAIN_MODEL, True, 64, 1, 3000),
        echo(64, 1, 4000, 15.0, 250, 200),  # 450 us x 4000/s = 1.8 cores of 2: CPU-bound
        server(MAIN_MODEL, True, 64, 32, 1500),
        echo(64, 32, 4000, 15.0, 260, 200),
        server(MAIN_MODEL, True, 8, 1024, 200),
        server(LARGE_MODEL, True, 64, 1, 2400),
        server(LARGE_MODEL, False, 64, 1, 1200),
    ]
    checks = checks_by_name(report_with(cells, HANDLER))

    latency = checks["1 word, concurrency 1"]
    assert latency.ratio == pytest.approx(0.84 / 0.6)
    assert latency.bound == pytest.approx((0.6 + 0.3) / 0.6)  # echo p50 + the handler's 300 us alone
    assert latency.passed is True

    one_word = checks["1 word, concurrency 64"]
    assert one_word.ratio == pytest.approx(3000 / 4000)
    assert one_word.bound == pytest.approx(450 / (450 + 50))
    assert one_word.passed is False

    words32 = checks["32 words, concurrency 64"]
    assert words32.ratio == pytest.approx(1500 / 4000)
    assert words32.bound == pytest.approx(460 / (460 + 250))

    assert checks["1024 words, concurrency 8"].ratio == pytest.approx(200 * 1024 / 250_000)

    large = checks["large model, 1 word, concurrency 64"]
    assert large.ratio == pytest.approx(2.0) and large.passed is True
    assert large.bound == pytest.approx(3000 / 1200)  # the small model's rate over the large model's, batching off

    assert checks["RSS under load / idle"].ratio == pytest.approx(1.2)


@pytest.mark.unit
def test_a_target_measured_in_repeats_takes_the_median_ratio() -> None:
    cells = []
    for repeat, (ours, theirs) in enumerate([(2000, 4000), (3600, 4000), (3000, 4000)]):
        cells += [server(MAIN_MODEL, True, 64, 1, ours), echo(64, 1, theirs, 15.0, 250, 200)]
        cells[-2].repeat = cells[-1].repeat = repeat
    report = report_with(cells, HANDLER)
    check = checks_by_name(report)["1 word, concurrency 64"]
    assert check.ratio == pytest.approx(0.75)  # of 0.5, 0.9 and 0.75
    assert "server 3,000 words/s / echo 4,000 req/s; median of 3 repeats: 0.50, 0.90, 0.75" in check.detail
    assert render(report, evaluate(report)).count("| unary | on | 64 | 1 |") == 1  # repeats stay out of the tables


@pytest.mark.unit
def test_no_cpu_bound_is_claimed_when_the_echo_left_cores_idle() -> None:
    cells = [server(MAIN_MODEL, True, 64, 1, 3000), echo(64, 1, 1000, 15.0, 250, 200)]  # 0.45 of 2 cores
    check = checks_by_name(report_with(cells, HANDLER))["1 word, concurrency 64"]
    assert check.ratio == pytest.approx(3.0)
    assert check.bound is None


@pytest.mark.unit
def test_the_report_shows_every_table_and_the_bounds() -> None:
    cells = [server(MAIN_MODEL, True, 64, 1, 3000), echo(64, 1, 4000, 15.0, 250, 200)]
    report = report_with(cells, HANDLER)
    report.tuning = [{"flags": "--max-queue-delay-ms 0 --run-threads 1", "model": MAIN_MODEL, "concurrency": 8,
                      "words": 1, "requests_per_s": 2000.0, "words_per_s": 2000.0, "p50_ms": 4.0,
                      "avg_batch_words": 1.5}]
    text = render(report, evaluate(report))
    for heading in ("## Targets", "## Ceilings", "## In-process limit", "## Our handler without gRPC",
                    "## Transport limit: grpc.aio echo", "## Tuning", "## Memory", "## How to read this"):
        assert heading in text
    assert ("| 1 word, concurrency 64: throughput | server 3,000 words/s / echo 4,000 req/s | 0.75 | >= 0.9 | **miss** "
            "| 0.90:") in text
    assert "| `--max-queue-delay-ms 0 --run-threads 1` | lstm | 8 | 1 | 2,000 | 4.000 | 1.5 |" in text


@pytest.mark.e2e
def test_the_handler_is_measured_without_grpc_on_the_real_engine(model_repository: Path) -> None:
    plan = replace(QUICK, warmup_s=0.05, inprocess_s=0.05)
    config = ServerConfig(repository=model_repository, device="cpu", max_queue_delay_ms=1.0)
    rows = measure_handler(config, plan)
    assert [(row["concurrency"], row["words"], row["idle_gap_ms"] > 0) for row in rows] == [
        (1, 1, False), (64, 1, False), (64, 32, False), (1, 1, True), (1, 32, True)
    ]
    for row in rows:
        assert row["requests"] > 0 and row["requests_per_s"] > 0
        assert row["cpu_us_per_request"] > 0 and row["wall_us_per_request"] > 0
    assert all(row["idle_gap_ms"] >= 0.5 for row in rows[3:])  # at least the sleep asked for
    # 32 words cost more than one: the measurement sees the work it claims to see.
    assert rows[2]["cpu_us_per_request"] > rows[1]["cpu_us_per_request"]
    # With an idle gap the sleeps' own CPU was measured and taken off; the time in the handler excludes them.
    assert all(row["idle_cpu_us"] > 0 for row in rows[3:])
    for row in rows[3:]:  # each iteration is the handler plus a sleep of at least 0.5 ms
        assert row["wall_us_per_request"] + 450 < 1e6 / row["requests_per_s"], row


@pytest.mark.e2e
def test_the_in_process_limit_runs_the_highest_version_of_a_versioned_repository(model_repository: Path) -> None:
    plan = replace(QUICK, inprocess_s=0.02, batches=(1, 32))
    config = ServerConfig(repository=model_repository, device="cpu")
    rows = measure_inprocess(config, plan)
    assert [(row["model"], row["batch_words"]) for row in rows] == [
        ("lstm", 1), ("lstm", 32), ("large_lstm", 1), ("large_lstm", 32)
    ]
    assert all(row["runs"] >= 3 and row["words_per_s"] > 0 for row in rows)
