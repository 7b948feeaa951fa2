"""clients/bench/scaling.py's generated sections: rendered from measurements (fake here), kept by the benchmark."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from clients.bench import peer_rig, placement, scaling, sections

pytestmark = pytest.mark.unit


def rig_run(peer: str, words_per_s: float, cpu_pct: float) -> dict[str, object]:
    return {
        "peer": peer, "started": "2026-12-04 20:00:00 UTC", "finished": "2026-12-04 20:02:00 UTC",
        "idle_rss_mib": 80.0, "idle_nprocs": 3,
        "cells": [
            {"batch_words": w, "concurrency": c, "words_per_s": words_per_s * w, "infer_per_s": words_per_s,
             "p99_ms": 2.0, "server_cpu_pct": cpu_pct, "client_cpu_pct": cpu_pct / 2, "words_per_ort_call": 1.5}
            for w, c in peer_rig.PEER_CELLS
        ],
    }


def test_the_peer_table_states_ratios_cpu_per_request_and_its_sources(tmp_path: Path) -> None:
    for name, wps, cpu in (("grpc-echo", 2000.0, 100.0), ("ours", 1000.0, 100.0), ("torchserve", 500.0, 50.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rig_run(name, wps, cpu)))
    section = peer_rig.render_peers(tmp_path, "bash run_all.sh echo ours torchserve", "Shared machine.")
    assert "| **ours** | 1,000 (2.0) |" in section
    assert "| ours / TorchServe, words/s (target >= 1.0) | 2.00 |" in section
    assert "| ours / echo, server CPU per request (target <= 1.3) | 2.00 |" in section  # 1000 us vs 500 us
    assert "| **ours** | 1,000 | " in section  # server CPU us per request
    assert "| **ours** | 500 | " in section  # client CPU us per request: 50 % / 1000 requests/s
    # at c64: 2 CPUs / (echo's 500 us + our client's 500 us) = 2000 requests/s = 4x TorchServe's 500
    assert "(echo server + our client us per request) | - | - | 4.00 | - | - | 4.00 |" in section
    assert "bash run_all.sh echo ours torchserve" in section and "Shared machine." in section


def test_with_the_rigs_inproc_step_the_table_states_the_floors_of_any_server_running_the_model(tmp_path: Path) -> None:
    for name, wps, cpu in (("grpc-echo", 2000.0, 100.0), ("ours", 1000.0, 100.0), ("torchserve", 500.0, 50.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rig_run(name, wps, cpu)))
    without = peer_rig.render_peers(tmp_path, "bash run_all.sh echo ours torchserve", "")
    assert "floor of ours / echo" not in without  # no ort_inproc.json: no floors claimed
    inproc = {"model": "lstm3.onnx", "seq": 5, "rows": [
        {"intra_op_threads": 1, "batch_words": 1, "calls_per_s": 10000.0},  # 100 us a run
        {"intra_op_threads": 1, "batch_words": 32, "calls_per_s": 4000.0},  # 250 us a run
        {"intra_op_threads": 2, "batch_words": 32, "calls_per_s": 8000.0},  # not the 1-thread figure
    ]}
    (tmp_path / "ort_inproc.json").write_text(json.dumps(inproc))
    section = peer_rig.render_peers(tmp_path, "bash run_all.sh inproc echo ours torchserve", "")
    assert "| ort_inproc |" not in section  # not a server row
    # echo 500 us per request: 1 + 100/500 = 1.20 (1 word), 1 + 250/500 = 1.50 (32 words)
    assert "/ echo us per request | 1.20 | 1.20 | 1.20 | 1.50 | 1.50 | 1.50 |" in section
    # c64: 2 CPUs / (500 + 100 + 500 us) = 1818 requests/s = 3.64x TorchServe's 500; 32 w: 2 / 1250 us = 3.20x
    assert "(echo server + model run + our client us per request) | - | - | 3.64 | - | - | 3.20 |" in section


def test_a_tagged_run_of_ours_is_a_variant_row_beside_the_first(tmp_path: Path) -> None:
    for name, wps in (("ours", 1000.0), ("ours-inline100", 900.0), ("torchserve", 500.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rig_run(name, wps, 100.0)))
    section = peer_rig.render_peers(tmp_path, "TAG=-inline100 bash run_all.sh ours", "Shared machine.")
    assert "| ours, variant `inline100` | 900 (2.0) |" in section
    assert section.index("| **ours** |") < section.index("variant `inline100`") < section.index("| TorchServe |")
    assert "| ours / TorchServe, words/s (target >= 1.0) | 2.00 |" in section  # ratios are the first run's


def test_the_workers_table_takes_medians_and_ratios() -> None:
    rows = [
        {"repeat": r, "workers": w, "words": words, "concurrency": c, "words_per_s": 1000.0 * w + r,
         "requests_per_s": 1000.0, "p99_ms": 5.0, "errors": {}, "server_cpu": 0.9, "client_cpu": 0.4,
         "server_us_per_request": 900.0, "client_us_per_request": 400.0}
        for r in range(2) for w in (1, 2) for words, c in scaling.CELLS
    ]
    plan = placement.MeasurePlan((1, 2), repeats=2, duration_s=5.0)
    section = scaling.render_workers(rows, plan, "python -m clients.bench.scaling workers", "2026-12-04 20:00",
                                     (1.0, 1.0, 1.0))
    assert "| 2 | 1 | 64 | 2,000 [2,000-2,001] | 5.0 | 90 | 900 | 400 | - |" in section
    assert "| 2 | 2.00 | 2.00 | 2.00 | 2.00 |" in section
    assert "the load generator shares the cores with the server" in section
    assert "charrnn-loadgen in one process" in section
    assert "Idle memory" not in section  # rows without it (older runs)


def test_the_workers_section_says_where_server_and_load_generator_ran_and_which_provider_ran() -> None:
    rows = [
        {"repeat": 0, "workers": w, "words": words, "concurrency": c, "provider": "CUDAExecutionProvider",
         "server_cpus": "0-7", "server_rss_mib": 100.0 * w, "server_pss_mib": 80.0 * w, "gpu_memory_mib": 500.0 * w,
         "words_per_s": 1000.0, "requests_per_s": 1000.0, "p99_ms": 5.0, "errors": {},
         "server_cpu": 0.9, "client_cpu": 0.4, "server_us_per_request": 900.0, "client_us_per_request": 400.0}
        for w in (1, 8) for words, c in scaling.CELLS
    ]
    plan = placement.MeasurePlan((1, 8), 1, 3.0, "auto", frozenset(range(8)), frozenset(range(8, 16)), 8)
    section = scaling.render_workers(rows, plan, "python -m clients.bench.scaling workers", "2026-12-07 12:00",
                                     (1.0, 1.0, 1.0))
    assert ("the server pinned to CPUs 0-7, the load generator pinned to CPUs 8-15 (cores of its own) "
            "(the server's processes' affinity, read back: 0-7)") in section
    assert "`--device auto --workers N`" in section and "execution provider CUDAExecutionProvider" in section
    assert "charrnn-loadgen in 8 processes" in section
    assert "| 8 | 800 | 640 | 80 | 4,000 |" in section  # idle memory: RSS and PSS summed, PSS per worker, GPU
    shared = placement.MeasurePlan(server_cpus=frozenset({0}), client_cpus=frozenset({0, 1}))
    assert shared.where() == "the server pinned to CPU 0, the load generator pinned to CPUs 0-1 (shared)"
    client_only = placement.MeasurePlan(client_cpus=frozenset({1}))
    assert client_only.where() == "the server on all CPUs, the load generator pinned to CPU 1 (shared)"
    assert not client_only.rigs_conditions() and scaling.floors_section(client_only) == "floors-pinned"
    assert scaling.floors_section(placement.MeasurePlan(client_processes=4)) == "floors-pinned"
    assert scaling.floors_section(placement.MeasurePlan()) == "floors"


def test_cpu_lists_are_read_as_taskset_writes_them_and_only_usable_cpus_are_taken() -> None:
    usable = sorted(os.sched_getaffinity(0))
    assert placement.cpu_list(str(usable[0])) == frozenset({usable[0]})
    assert placement.cpu_list(",".join(map(str, usable))) == frozenset(usable)
    if usable == list(range(usable[0], usable[-1] + 1)):  # contiguous, as on the CI machine
        assert placement.cpu_list(f"{usable[0]}-{usable[-1]}") == frozenset(usable)
    assert placement.cpus_text(frozenset({0, 1, 2, 5, 7, 8})) == "0-2,5,7-8"
    for text in ("0-x", "1-0", "0-0,3-1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="not a CPU list"):
            placement.cpu_list(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"CPU 4096 not usable here \(usable: "):
        placement.cpu_list("4096")


def test_sections_are_replaced_in_place_and_survive_the_benchmark_rewrite() -> None:
    begin, end = sections.SECTIONS["workers"]
    document = f"# Performance\n\nbody\n\n{begin}\nold\n{end}\n\ntail\n"
    replaced = sections.with_section(document, "workers", f"{begin}\nnew\n{end}\n")
    assert "new" in replaced and "old" not in replaced and replaced.endswith("tail\n")
    assert sections.section_of(replaced, "workers") == f"{begin}\nnew\n{end}\n"
    assert sections.section_of(replaced, "peers") is None
    assert sections.with_section("# P\n", "peers", "X\n") == "# P\n\nX\n"


def floor_rows() -> list[dict[str, object]]:
    costs = {"echo": 300.0, "floor": 390.0, "ours": 600.0}
    return [
        {"repeat": r, "server": name, "words": words, "concurrency": c, "response_bytes": 100 * words,
         "words_per_s": 1e6 / costs[name] * words + r, "requests_per_s": 1e6 / costs[name], "p99_ms": 5.0,
         "errors": {"UNAVAILABLE": 1} if (name, r, words, c) == ("ours", 1, 1, 1) else {},
         "server_cpu": 1.0, "client_cpu": 0.4, "server_us_per_request": costs[name] + 10 * r,
         "client_us_per_request": 200.0}
        for r in range(2) for name in scaling.FLOOR_SERVERS for words, c in peer_rig.PEER_CELLS
    ]


def test_the_floors_table_states_each_servers_cost_and_the_ratios_to_the_echo_and_the_model_floor() -> None:
    section = scaling.render_floors(floor_rows(), placement.MeasurePlan(repeats=2, duration_s=5.0),
                                    "python -m clients.bench.scaling floors", "2026-12-07 11:00", (1.0, 1.0, 1.0))
    begin, end = sections.SECTIONS["floors"]
    assert section.startswith(begin) and section.rstrip().endswith(end)
    assert "`python -m clients.bench.scaling floors` on 2026-12-07 11:00 UTC" in section
    assert "| echo (transport only) | 305 | 305 | 305 | 305 | 305 | 305 |" in section  # medians of 300 and 310
    assert "| **ours** (charrnn-server, defaults) | 605 | 605 |" in section
    assert "(target for ours <= 1.3) | 1.30 | 1.30 |" in section  # 395 / 305
    assert "| ours / echo, server CPU per request | 1.98 |" in section  # 605 / 305
    assert "| ours / model floor, server CPU per request | 1.53 |" in section  # 605 / 395
    assert "| ours / model floor, words/s | 0.65 |" in section  # (1667 + 0.5) / (2564 + 0.5)
    assert "Errors: 1." in section


def test_the_floors_section_is_kept_like_the_others() -> None:
    begin, end = sections.SECTIONS["floors"]
    document = sections.with_section("# Performance\n", "floors", f"{begin}\nfloors\n{end}\n")
    assert sections.section_of(document, "floors") == f"{begin}\nfloors\n{end}\n"
    assert sections.section_of(document, "workers") is None


def test_pinned_floors_say_where_they_ran_and_have_a_section_of_their_own_beside_the_rigs() -> None:
    plan = placement.MeasurePlan(repeats=2, duration_s=5.0, server_cpus=frozenset({0}), client_cpus=frozenset({1}),
                                 client_processes=4)
    rows = [{**row, "server_cpus": "0"} for row in floor_rows()]
    section = scaling.render_floors(rows, plan, "python -m clients.bench.scaling floors --server-cpus 0",
                                    "2026-12-07 12:00", (1.0, 1.0, 1.0))
    begin, end = sections.SECTIONS["floors-pinned"]
    assert section.startswith(begin) and section.rstrip().endswith(end)
    assert "and ours, placed otherwise" in section
    assert ("each server pinned to CPU 0, the load generator pinned to CPU 1 (cores of its own) "
            "(the server's processes' affinity, read back: 0)") in section
    assert "charrnn-loadgen in 4 processes" in section
    unpinned = scaling.render_floors(floor_rows(), placement.MeasurePlan(repeats=2, duration_s=5.0), "floors",
                                     "2026-12-07 12:00", (1.0, 1.0, 1.0))
    assert "the load generator shares the cores with each server" in unpinned
    document = sections.with_section(sections.with_section("# P\n", "floors", unpinned), "floors-pinned", section)
    assert sections.section_of(document, "floors") == unpinned and sections.section_of(document, "floors-pinned") == section


def test_the_benchmark_keeps_every_generated_section_the_file_had() -> None:
    previous = "# Performance\n\nold body\n"
    for name, (begin, end) in sections.SECTIONS.items():
        previous = sections.with_section(previous, name, f"{begin}\n{name} figures\n{end}\n")
    rewritten = sections.with_sections_of(previous, "# Performance\n\nnew body\n")
    assert "new body" in rewritten and "old body" not in rewritten
    for name in sections.SECTIONS:
        assert sections.section_of(rewritten, name) == sections.section_of(previous, name)
