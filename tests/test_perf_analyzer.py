"""clients/bench/perf_analyzer.py: its command line, input data, CSV reading and generated section (unit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.bench.perf_analyzer import (
    SECTION_BEGIN,
    SECTION_END,
    PerfAnalyzer,
    input_data,
    parse_csv,
    perf_analyzer_command,
    render_section,
)
from clients.bench.sections import section_of, with_section

pytestmark = pytest.mark.unit

# The -f CSV perf_analyzer 2.41.0 wrote against this server (concurrency 8, -b 32).
CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "8,27768.9,4,4784,3545,0,872,0,1,9922,11622,12435,15823\n"
)


def test_csv_gives_words_and_requests_per_second_and_latencies_in_ms() -> None:
    measured = parse_csv(CSV, words=32)
    assert measured["words_per_s"] == 27768.9 and measured["requests_per_s"] == pytest.approx(27768.9 / 32)
    assert (measured["p50_ms"], measured["p99_ms"]) == (9.922, 15.823)
    assert (measured["server_queue_ms"], measured["server_compute_ms"]) == (3.545, 0.872)


def test_input_data_is_one_word_of_the_alphabet_per_batch_item() -> None:
    data = input_data("héλo", count=20)
    assert len(data["data"]) == 20  # type: ignore[arg-type]
    for item in data["data"]:  # type: ignore[attr-defined]
        assert item["WORDS"]["shape"] == [1] and len(item["WORDS"]["content"][0]) == 8
        assert set(item["WORDS"]["content"][0]) <= set("héλo")


def test_command_is_grpc_with_words_as_the_batch_size(tmp_path: Path) -> None:
    tool = PerfAnalyzer.in_folder(tmp_path)
    command = perf_analyzer_command(tool, "127.0.0.1:1", "lstm", 64, 32, tmp_path / "w.json", tmp_path / "o.csv")
    assert command[:3] == [str(tmp_path / "perf_analyzer"), "-i", "grpc"]
    assert command[command.index("-b") + 1] == "32" and command[command.index("--concurrency-range") + 1] == "64"
    assert tool.env()["LD_LIBRARY_PATH"].startswith(str(tmp_path / "lib"))
    assert not tool.available()


def test_the_section_is_replaced_in_place_and_survives_a_rewrite_of_the_rest() -> None:
    row = {"concurrency": 1, "words": 1,
           "perf_analyzer": {"requests_per_s": 10.0, "words_per_s": 10.0, "p50_ms": 1.0, "p99_ms": 2.0,
                             "server_queue_ms": 0.0, "server_compute_ms": 0.1},
           "loadgen": {"requests_per_s": 9.0, "words_per_s": 9.0, "p50_ms": 1.1, "p99_ms": 2.2}}
    section = render_section("python -m clients.bench.perf_analyzer run", "2026-12-04 19:00", ["--batching"], "2.41.0", [row])
    assert section.startswith(SECTION_BEGIN) and section.rstrip().endswith(SECTION_END)
    assert "| 1 | 1 | perf_analyzer | KServe V2 | 10 | 10 | 1.00 | 2.00 | 0.00 | 0.10 |" in section
    document = with_section("# Performance\n\nbody\n", "perf_analyzer", section)
    assert document == "# Performance\n\nbody\n\n" + section
    newer = section.replace("2026-12-04", "2026-12-05")
    rewritten = with_section(document, "perf_analyzer", newer)
    assert rewritten.count(SECTION_BEGIN) == 1 and "2026-12-05" in rewritten
    # What the benchmark does when it regenerates the rest of the file: the section is kept as it was.
    kept = section_of(document, "perf_analyzer")
    assert kept == section and with_section("# Performance\n\nnew body\n", "perf_analyzer", kept).endswith(section)
    assert section_of("# no section\n", "perf_analyzer") is None
