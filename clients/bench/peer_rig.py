"""The shared peer rig's results (../shared/peers) as a generated section of docs/performance.md.

render_peers() reads the JSON of one pass of `run_all.sh inproc echo ours torchserve` and writes a table:
words/s (p99), server and load-generator CPU per request for every cell, and ours against TorchServe and the
echo. With the rig's `inproc` step in the same pass (ort_inproc.json: onnxruntime alone, 1 thread, on the same
model) it adds two floors that no server running this model in its own process can beat: the echo's CPU plus
the model's run as it costs in a tight loop (a lower bound: clients.bench.scaling floors measures the run where
it really runs, between gRPC calls). `python -m clients.bench.scaling peers` is its command line.
"""

from __future__ import annotations

import json
from pathlib import Path

from clients.bench.sections import SECTIONS, now_utc

PEER_CELLS = ((1, 1), (1, 8), (1, 64), (32, 1), (32, 8), (32, 64))
"""(words per request, concurrency) of the rig's cells."""
CPUS = 2
"""The rig machine's CPUs, shared by the server and the load generator (../shared/peers/README.md)."""


def model_run_us(inproc: dict[str, object] | None, words: int) -> float | None:
    """onnxruntime's own time for one run of `words` words (1 intra-op thread), from the rig's ort_inproc.json;
    None without it."""
    for row in (inproc or {}).get("rows", []):  # type: ignore[attr-defined]
        if row.get("intra_op_threads") == 1 and row.get("batch_words") == words and row.get("calls_per_s"):
            return 1e6 / float(row["calls_per_s"])
    return None


def _cell(run: dict[str, object], words: int, concurrency: int) -> dict[str, object] | None:
    """A run's cell of that shape, or None."""
    for item in run.get("cells", []):  # type: ignore[union-attr]
        if item.get("batch_words") == words and item.get("concurrency") == concurrency:  # type: ignore[union-attr]
            return item  # type: ignore[return-value]
    return None


def _server_us(item: dict[str, object] | None) -> float:
    """Server CPU us per request of a cell (nan without one)."""
    if item is None or not item.get("infer_per_s"):
        return float("nan")
    return float(item["server_cpu_pct"]) / 100.0 / float(item["infer_per_s"]) * 1e6  # type: ignore[arg-type]


def _client_us(item: dict[str, object] | None) -> float:
    """Load-generator CPU us per request of a cell (nan without one)."""
    if item is None or not item.get("infer_per_s") or item.get("client_cpu_pct") is None:
        return float("nan")
    return float(item["client_cpu_pct"]) / 100.0 / float(item["infer_per_s"]) * 1e6  # type: ignore[arg-type]


def render_peers(results: Path, rig_command: str, note: str) -> str:
    """The peers section, from the rig's JSON files (grpc-echo, ours, torchserve; -run2 repeats too; ort_inproc
    for the model floors)."""
    begin, end = SECTIONS["peers"]
    runs = {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}
    inproc = runs.pop("ort_inproc", None)
    variants = sorted(name for name in runs if name.startswith("ours-") and name != "ours-run2")
    order = [name for name in ("grpc-echo", "grpc-echo-run2", "ours", "ours-run2", *variants, "torchserve") if name in runs]
    titles = {"grpc-echo": "bare grpc.aio echo (no model)", "grpc-echo-run2": "echo, repeat", "ours": "**ours**",
              "ours-run2": "ours, repeat", "torchserve": "TorchServe"}
    titles.update({name: f"ours, variant `{name[len('ours-'):]}`" for name in variants})  # TAG=-<variant> runs

    windows = ", ".join(f"{name} {runs[name].get('started', '?')} - {runs[name].get('finished', '?')}" for name in order)
    header = " | ".join(f"{w} w, c{c}" for w, c in PEER_CELLS)
    lines = [
        begin,
        "## The shared peer rig: ours beside TorchServe and the echo",
        "",
        f"Rendered by `python -m clients.bench.scaling peers --results {results}` on {now_utc()} UTC from one pass of "
        f"`{rig_command}` (../shared/peers, its `threads` client: one thread and one connection per request in "
        f"flight; 15 s cells after 2 s warm-up; the server with its own defaults). Runs: {windows}. {note}",
        "",
        "words/s (p99 ms):",
        "",
        f"| server | {header} | idle RSS MiB (processes) |",
        "|---|" + "---:|" * (len(PEER_CELLS) + 1),
    ]
    for name in order:
        run = runs[name]
        values = []
        for words, concurrency in PEER_CELLS:
            item = _cell(run, words, concurrency)
            values.append("-" if item is None else f"{float(item['words_per_s']):,.0f} ({float(item['p99_ms']):.1f})")  # type: ignore[arg-type]
        lines.append(f"| {titles[name]} | " + " | ".join(values) + f" | {run.get('idle_rss_mib', '-')} ({run.get('idle_nprocs', '-')}) |")
    lines += ["", "Server CPU per request (server CPU % / requests/s), us:", "", f"| server | {header} |",
              "|---|" + "---:|" * len(PEER_CELLS)]
    for name in order:
        lines.append(f"| {titles[name]} | " + " | ".join(
            f"{_server_us(_cell(runs[name], w, c)):,.0f}" for w, c in PEER_CELLS) + " |")
    lines += ["", "Load generator CPU per request (client CPU % / requests/s), us: the other share of the same 2 CPUs:", "",
              f"| server | {header} |", "|---|" + "---:|" * len(PEER_CELLS)]
    for name in order:
        lines.append(f"| {titles[name]} | " + " | ".join(
            f"{_client_us(_cell(runs[name], w, c)):,.0f}" for w, c in PEER_CELLS) + " |")
    if "ours" in runs:
        lines += ["", "Ratios per cell (ours first pass):", "", f"| ratio | {header} |", "|---|" + "---:|" * len(PEER_CELLS)]
        for other, label in (("torchserve", "ours / TorchServe, words/s (target >= 1.0)"),
                             ("grpc-echo", "ours / echo, server CPU per request (target <= 1.3)")):
            if other not in runs:
                continue
            ratios = []
            for words, concurrency in PEER_CELLS:
                mine, theirs = _cell(runs["ours"], words, concurrency), _cell(runs[other], words, concurrency)
                if mine is None or theirs is None:
                    ratios.append("-")
                elif other == "torchserve":
                    ratios.append(f"{float(mine['words_per_s']) / float(theirs['words_per_s']):.2f}")  # type: ignore[arg-type]
                else:
                    ratios.append(f"{_server_us(mine) / _server_us(theirs):.2f}")
            lines.append(f"| {label} | " + " | ".join(ratios) + " |")
        merged = []
        for words, concurrency in PEER_CELLS:
            item = _cell(runs["ours"], words, concurrency)
            merged.append("-" if item is None or item.get("words_per_ort_call") is None else f"{float(item['words_per_ort_call']):.1f}")  # type: ignore[arg-type]
        if "grpc-echo" in runs and "torchserve" in runs:
            # With a server as cheap as the echo (which runs no model), ours could do at most this (_c64_ratio).
            bounds = []
            for words, concurrency in PEER_CELLS:
                mine, echo, theirs = (_cell(runs[n], words, concurrency) for n in ("ours", "grpc-echo", "torchserve"))
                if concurrency < 64 or mine is None or echo is None or theirs is None:
                    bounds.append("-")
                    continue
                bounds.append(_c64_ratio(_server_us(echo) + _client_us(mine), words, theirs))
            lines.append("| bound at concurrency 64, ours / TorchServe, were our server CPU per request the echo's: "
                         f"{CPUS} CPUs / (echo server + our client us per request) | " + " | ".join(bounds) + " |")
            if inproc is not None:
                lines += _model_floors(inproc, runs)
        lines.append("| ours: words per onnxruntime run (charrnn_batch_words) | " + " | ".join(merged) + " |")
    lines += ["", end]
    return "\n".join(lines) + "\n"


def _c64_ratio(box_us_per_request: float, words: int, theirs: dict[str, object]) -> str:
    """Where both sides saturate the box (concurrency 64), requests/s <= CPUS / (server + client CPU per
    request): the words/s a server costing `box_us_per_request` (with its client) could reach, against theirs."""
    ceiling = CPUS / (box_us_per_request / 1e6) * words
    return f"{ceiling / float(theirs['words_per_s']):.2f}"  # type: ignore[arg-type]


def _model_floors(inproc: dict[str, object], runs: dict[str, dict[str, object]]) -> list[str]:
    """Two rows of floors for a server that is the echo plus the model's own run (the least any server running
    this model in its own process can cost): its CPU against the echo's, and at concurrency 64 its words/s
    against TorchServe's."""
    cpu_floors, bounds = [], []
    for words, concurrency in PEER_CELLS:
        model_us = model_run_us(inproc, words)
        echo, mine, theirs = (_cell(runs[name], words, concurrency) for name in ("grpc-echo", "ours", "torchserve"))
        if model_us is None or echo is None:
            cpu_floors.append("-")
            bounds.append("-")
            continue
        cpu_floors.append(f"{1 + model_us / _server_us(echo):.2f}")
        if concurrency < 64 or mine is None or theirs is None:
            bounds.append("-")
            continue
        bounds.append(_c64_ratio(_server_us(echo) + model_us + _client_us(mine), words, theirs))
    return [
        "| floor of ours / echo, server CPU per request, for any server running the model, with the run as it "
        "costs in a tight loop (warm caches; under load it costs 2-5x that: the floors section measures it): "
        "1 + the model's own run (ort_inproc, 1 thread) / echo us per request | " + " | ".join(cpu_floors) + " |",
        "| bound at concurrency 64, ours / TorchServe, were our server the echo plus the model's own run (tight "
        f"loop, as above): {CPUS} CPUs / (echo server + model run + our client us per request) | "
        + " | ".join(bounds) + " |",
    ]
