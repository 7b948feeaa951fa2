"""Triton's perf_analyzer against our Open Inference Protocol front end, beside charrnn-loadgen, in one run.

    python -m clients.bench.perf_analyzer install DIR          # fetch perf_analyzer and libcudart (PyPI)
    python -m clients.bench.perf_analyzer run --tool-dir DIR [--out docs/performance.md] [--device cpu]

`run` exports the built-in lstm, starts one charrnn-server (batching on, as the benchmark starts it), and for
each cell (concurrency x words per request) measures perf_analyzer over inference.GRPCInferenceService/ModelInfer
(`-b WORDS`: one request carries WORDS words, `--input-data` words over the model's alphabet) and then
charrnn-loadgen over charrnn.v1 Encode, same server, same shape, back to back. It writes the table into
its own generated section of docs/performance.md (clients.bench.sections: between its markers, with its command
and date); `python -m clients.bench.benchmark` keeps that section when it rewrites the rest of the file.

Where perf_analyzer comes from: the PyPI `perf-analyzer` package is an empty placeholder; the binary that works
ships in the tritonclient==2.41.0 wheel (data/bin/perf_analyzer). It links libcudart.so.12 (from the
nvidia-cuda-runtime-cu12 wheel, put on LD_LIBRARY_PATH only so that it loads; no GPU is used) and libb64
(Debian: `apt-get install libb64-0d`). `install` puts both files in DIR.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clients.bench.plan import MAIN_MODEL, WORD_LENGTH, log
from clients.bench.sections import SECTIONS, now_utc, write_section

TRITONCLIENT_WITH_PERF_ANALYZER = "tritonclient==2.41.0"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12"
BINARY = "perf_analyzer"
CELLS = ((1, 1), (8, 1), (64, 1), (8, 32), (64, 32))
"""(concurrency, words per request): the benchmark's main-table shapes that perf_analyzer can drive quickly."""
SECTION_BEGIN, SECTION_END = SECTIONS["perf_analyzer"]
MEASUREMENT_MS = 1500
"""perf_analyzer's measurement window; it measures until three windows agree (or gives up after 10)."""
STABILITY_PERCENT = 50
"""How far three windows may differ and still count as stable (perf_analyzer's default, 10, is never met at
concurrency 64 on a 2-core machine shared with other work)."""
LOADGEN_S = 2.0
LOADGEN_WARMUP_S = 0.5


@dataclass(frozen=True, slots=True)
class PerfAnalyzer:
    """The perf_analyzer binary and the library folder it needs on LD_LIBRARY_PATH."""

    binary: Path
    library_dir: Path

    @classmethod
    def in_folder(cls, folder: Path) -> PerfAnalyzer:
        """The tool as `install` lays it out."""
        return cls(folder / BINARY, folder / "lib")

    def available(self) -> bool:
        """Whether it is there and starts (libb64 installed, libcudart found)."""
        if not self.binary.exists():
            return False
        return self.version() is not None

    def version(self) -> str | None:
        """What `perf_analyzer --version` says (it prints to stderr), None if it does not start."""
        result = subprocess.run([str(self.binary), "--version"], env=self.env(), capture_output=True, text=True)
        match = re.search(r"Perf Analyzer Version (\S+)", result.stdout + result.stderr)
        return match.group(1) if result.returncode == 0 and match else None

    def env(self) -> dict[str, str]:
        """The environment it runs with."""
        path = os.environ.get("LD_LIBRARY_PATH", "")
        return {**os.environ, "LD_LIBRARY_PATH": f"{self.library_dir}{':' + path if path else ''}"}


def install(folder: Path) -> PerfAnalyzer:
    """Download the two wheels with pip and unpack perf_analyzer and libcudart.so.12 into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", scratch,
             TRITONCLIENT_WITH_PERF_ANALYZER, CUDA_RUNTIME],
            check=True,
        )
        for wheel in Path(scratch).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if name.endswith(f"/bin/{BINARY}"):
                        target = folder / BINARY
                    elif name.endswith("/libcudart.so.12"):
                        (folder / "lib").mkdir(exist_ok=True)
                        target = folder / "lib" / "libcudart.so.12"
                    else:
                        continue
                    target.write_bytes(archive.read(name))
                    target.chmod(0o755)
    tool = PerfAnalyzer.in_folder(folder)
    if not tool.available():
        raise RuntimeError(f"{tool.binary} does not start: is libb64 installed (apt-get install libb64-0d)?")
    return tool


def input_data(alphabet: str, count: int = 256, seed: int = 0) -> dict[str, object]:
    """perf_analyzer --input-data: `count` words of WORD_LENGTH letters of the alphabet, one per batch item."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(alphabet) for _ in range(WORD_LENGTH)) for _ in range(count)]
    return {"data": [{"WORDS": {"content": [word], "shape": [1]}} for word in words]}


def perf_analyzer_command(tool: PerfAnalyzer, target: str, model: str, concurrency: int, words: int,
                          data: Path, csv_file: Path) -> list[str]:
    """The perf_analyzer command line of one cell."""
    return [
        str(tool.binary), "-i", "grpc", "-u", target, "-m", model, "-b", str(words),
        "--concurrency-range", str(concurrency), "--input-data", str(data),
        "--measurement-interval", str(MEASUREMENT_MS), "--max-trials", "10",
        "--stability-percentage", str(STABILITY_PERCENT), "-f", str(csv_file),
    ]


def parse_csv(text: str, words: int) -> dict[str, float]:
    """perf_analyzer's -f CSV (one row per concurrency) -> words/s, requests/s, latency ms, server breakdown."""
    row = next(csv.DictReader(io.StringIO(text)))
    words_per_s = float(row["Inferences/Second"])
    return {
        "words_per_s": words_per_s,
        "requests_per_s": words_per_s / words,
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "server_queue_ms": float(row["Server Queue"]) / 1000,
        "server_compute_ms": float(row["Server Compute Infer"]) / 1000,
    }


def run_perf_analyzer(tool: PerfAnalyzer, target: str, model: str, concurrency: int, words: int,
                      alphabet: str, folder: Path) -> dict[str, float]:
    """One perf_analyzer cell; raises with its output if it fails."""
    data = folder / "words.json"
    data.write_text(json.dumps(input_data(alphabet)))
    csv_file = folder / f"pa-{concurrency}-{words}.csv"
    command = perf_analyzer_command(tool, target, model, concurrency, words, data, csv_file)
    result = subprocess.run(command, env=tool.env(), capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or not csv_file.exists():
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}): {shlex.join(command)}\n"
                           f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return parse_csv(csv_file.read_text(), words)


def run_loadgen(target: str, model: str, concurrency: int, words: int) -> dict[str, float]:
    """The same cell with charrnn-loadgen (charrnn.v1 Encode, closed loop, in this process)."""
    from clients.loadgen.config import LoadConfig
    from clients.loadgen.fanout import run_load

    result = run_load(LoadConfig(
        target=target, model=model, concurrency=concurrency, words_per_request=words, word_length=WORD_LENGTH,
        duration_s=LOADGEN_S, warmup_s=LOADGEN_WARMUP_S,
    ))
    return {
        "words_per_s": result.words_per_s, "requests_per_s": result.requests_per_s,
        "p50_ms": result.latency_ms["p50"], "p99_ms": result.latency_ms["p99"],
        "errors": float(sum(result.errors.values())),
    }


def render_section(command: str, started: str, server_flags: Sequence[str], version: str,
                   rows: Sequence[dict[str, object]]) -> str:
    """The generated markdown section (begin and end markers included)."""
    lines = [
        SECTION_BEGIN,
        "## perf_analyzer (Open Inference Protocol) beside charrnn-loadgen (charrnn.v1)",
        "",
        f"Generated by `{command}` on {started} UTC (a separate, shorter run than the tables above), on the same "
        f"machine. One charrnn-server (`{' '.join(server_flags)}`), model `{MAIN_MODEL}`, words of {WORD_LENGTH} "
        f"letters. For each cell, Triton's perf_analyzer {version} "
        "(`-i grpc -b WORDS --concurrency-range C --input-data`, a JSON file of words over the model's alphabet; "
        f"{MEASUREMENT_MS} ms windows until three agree within {STABILITY_PERCENT} %) drives `inference.GRPCInferenceService/ModelInfer`, then "
        f"charrnn-loadgen ({LOADGEN_S:g} s after {LOADGEN_WARMUP_S:g} s warm-up) drives `charrnn.v1.CharRnn/Encode`, "
        "back to back on the same server. Both are closed loops with C requests in flight; perf_analyzer's "
        "infer/s are words/s. Its server columns are what it reads from ModelStatistics (per request: queue; "
        "per onnxruntime run: compute).",
        "",
        "| concurrency | words/request | tool | protocol | requests/s | words/s | p50 ms | p99 ms | server queue ms | server compute ms |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        pa, lg = row["perf_analyzer"], row["loadgen"]
        assert isinstance(pa, dict) and isinstance(lg, dict)
        lines.append(
            f"| {row['concurrency']} | {row['words']} | perf_analyzer | KServe V2 | {pa['requests_per_s']:,.0f} | "
            f"{pa['words_per_s']:,.0f} | {pa['p50_ms']:.2f} | {pa['p99_ms']:.2f} | {pa['server_queue_ms']:.2f} | "
            f"{pa['server_compute_ms']:.2f} |"
        )
        lines.append(
            f"| {row['concurrency']} | {row['words']} | charrnn-loadgen | charrnn.v1 | {lg['requests_per_s']:,.0f} | "
            f"{lg['words_per_s']:,.0f} | {lg['p50_ms']:.2f} | {lg['p99_ms']:.2f} | | |"
        )
    lines += [
        "",
        "perf_analyzer is a C++ client with one thread per request in flight; charrnn-loadgen is Python "
        "(grpc.aio) in one process. On this 2-core machine each shares the cores with the server, so the "
        "columns compare tools as much as protocols: read them as \"both protocols work at these rates\", not "
        "as a protocol ranking.",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def run(tool: PerfAnalyzer, out: Path, device: str, cells: Sequence[tuple[int, int]], command: str) -> list[dict[str, object]]:
    """Measure every cell with both tools on one server and write the section into `out`."""
    from clients.bench.servers import start_server
    from clients.loadgen.pool import fetch_alphabet
    from export.models import BUILTIN_SPECS, seeded_model
    from export.repository import export_model

    started = now_utc()
    version = tool.version() or "(unknown version)"
    server_flags = ["--batching", "--max-queue-delay-ms", "5"]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="charrnn-perf-analyzer-") as scratch:
        folder = Path(scratch)
        log("exporting the built-in lstm")
        repository = folder / "model_repository"
        export_model(seeded_model(BUILTIN_SPECS[MAIN_MODEL]), repository)
        server = start_server("server", repository, folder, device, True, ["--max-queue-delay-ms", "5"])
        try:
            alphabet = fetch_alphabet(server.target, MAIN_MODEL)
            for concurrency, words in cells:
                log(f"perf_analyzer then charrnn-loadgen: concurrency {concurrency}, {words} words/request")
                measured = run_perf_analyzer(tool, server.target, MAIN_MODEL, concurrency, words, alphabet, folder)
                rows.append({"concurrency": concurrency, "words": words, "perf_analyzer": measured,
                             "loadgen": run_loadgen(server.target, MAIN_MODEL, concurrency, words)})
        finally:
            server.stop_or_kill()
    section = render_section(command, started, server_flags, version, rows)
    write_section(out, "perf_analyzer", section)
    log(f"wrote the perf_analyzer section of {out}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`install DIR` or `run --tool-dir DIR`."""
    parser = argparse.ArgumentParser(prog="python -m clients.bench.perf_analyzer", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("install", help="download perf_analyzer and libcudart.so.12 into DIR")
    setup.add_argument("folder", type=Path)
    measure = commands.add_parser("run", help="measure and write the docs/performance.md section")
    measure.add_argument("--tool-dir", type=Path, required=True, help="where `install` put perf_analyzer")
    measure.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    measure.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    measure.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install(args.folder).binary)
        return 0
    tool = PerfAnalyzer.in_folder(args.tool_dir)
    if not tool.available():
        parser.error(f"{tool.binary} is missing or does not start: run `install {args.tool_dir}` "
                     "(and apt-get install libb64-0d)")
    shown = sys.argv[1:] if argv is None else list(argv)
    rows = run(tool, args.out, args.device, CELLS, "python -m clients.bench.perf_analyzer " + shlex.join(shown))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

