"""The performance benchmark: one run, one machine, every number in docs/performance.md.

    python -m clients.bench.benchmark [--quick] [--out docs/performance.md] [--json FILE] [--device auto|cpu|cuda]

In one run it measures
1. the in-process limit: ModelRuntime.start_run (our one-hot encoding + onnxruntime, no gRPC) for
   batches of 1, 32 and 1024 words;
2. the transport limit: a trivial grpc.aio echo service (generic handler, raw bytes, in a subprocess) driven
   by the same load generator at the same concurrency, answering payloads of the size of real responses;
3. charrnn-server (a subprocess, as users start it) at concurrency 1, 8, 64 x 1, 32, 1024 words per
   request, unary and streaming, with batching on and off, on the built-in LSTM;
4. the same for a larger LSTM exported from a checkpoint (alphabet of 57 letters, hidden 256, 2 layers);
5. the server's resident memory at idle and its peak under load (psutil, sampled every 50 ms);
and, to explain the ratios, our Encode handler without gRPC (its CPU and time per request), the CPU per
request of every server and of the load generator, and the batching knobs side by side (tuning). It then
writes a markdown report: machine, versions, the execution provider actually used, every table, the ratios
against the targets and the best ratio this machine allows for each. The report is regenerated, never
edited by hand.

Needs the test extras (torch to export the models, psutil). --device and --server-arg are passed to the
servers, so the same command runs on a GPU machine with --device cuda.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from clients.bench.cells import run_cells, run_target_repeats, run_tuning
from clients.bench.environment import export_repository, machine_info
from clients.bench.inprocess import measure_handler, measure_inprocess
from clients.bench.plan import FULL, LARGE_MODEL, MAIN_MODEL, QUICK, Plan, Report, log
from clients.bench.report import fmt, render
from clients.bench.sections import with_sections_of
from clients.bench.servers import RssSampler, hwm_mib, providers_of, rss_mib, start_servers
from clients.bench.targets import evaluate
from server.config import parse_config

COMMAND = "clients.bench.benchmark"
"""The module that runs the benchmark (`python -m`), as the report names it."""


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {COMMAND}", description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run (fewer, shorter cells)")
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"), help="markdown report to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="passed to the servers and used for the in-process runs")
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                        help="the servers' --max-queue-delay-ms: how long a batch may wait for company once "
                             "traffic is evidently concurrent (a lone request never waits)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                        help="extra charrnn-server flag (repeatable), e.g. --server-arg=--run-threads=1")
    parser.add_argument("--client-processes", type=int, default=1, help="load-generator processes per cell")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming cells")
    parser.add_argument("--no-tuning", action="store_true", help="skip the side-by-side batching-knob servers")
    parser.add_argument("--target-repeats", type=int, default=None,
                        help="measure each target's pair of cells this many times (default: 3, 1 with --quick)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything and write the report."""
    args = build_parser().parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.no_stream:
        plan = Plan(**{**asdict(plan), "stream": False})
    if args.target_repeats is not None:
        plan = Plan(**{**asdict(plan), "target_repeats": max(1, args.target_repeats)})
    command = f"python -m {COMMAND} " + " ".join(shlex.quote(arg) for arg in (sys.argv[1:] if argv is None else argv))
    started = time.monotonic()
    report = Report(
        command=command.strip(),
        started_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        machine=machine_info(args.device),
        plan=asdict(plan),
        server_flags=["--max-queue-delay-ms", f"{args.max_queue_delay_ms:g}", *args.server_arg],
    )
    with tempfile.TemporaryDirectory(prefix="charrnn-benchmark-") as scratch:
        folder = Path(scratch)
        log("exporting the models")
        repository = export_repository(folder)
        # The servers' own reading of the flags they are started with (start_server puts --device first too).
        config = parse_config(["--repository", str(repository), "--device", args.device, *report.server_flags], {})
        log("in-process limit")
        report.inprocess = measure_inprocess(config, plan)
        log("handler without gRPC")
        report.handler = measure_handler(config, plan)
        with start_servers(repository, folder, args.device, report.server_flags) as (servers, echo):
            report.providers = providers_of(servers[True])
            time.sleep(1.0)  # let start-up settle before reading idle memory
            idle = {batching: rss_mib(server.process.pid) for batching, server in servers.items()}
            sampler = RssSampler({server.name: server.process.pid for server in servers.values()})
            try:
                run_cells(report, plan, servers, echo, sampler, args.client_processes)
                run_target_repeats(report, plan, servers, echo, sampler, args.client_processes)
            finally:
                sampler.close()
            for batching, server in servers.items():
                # The main tables' cells only: the repeats come after the large model's big batches, whose
                # memory onnxruntime's arena keeps, and would charge it to the small model.
                cells = [c for c in report.cells if c.target == "server" and c.batching is batching and not c.repeat]
                peaks = [c.peak_rss_mib or 0.0 for c in cells]
                main_peaks = [c.peak_rss_mib or 0.0 for c in cells if c.model == MAIN_MODEL]
                large_peaks = [c.peak_rss_mib or 0.0 for c in cells if c.model == LARGE_MODEL]
                report.memory[f"batching {'on' if batching else 'off'}"] = {
                    "idle_mib": idle[batching],
                    "peak_main_mib": max(main_peaks, default=0.0),
                    "peak_large_mib": max(large_peaks, default=0.0) if large_peaks else float("nan"),
                    "peak_mib": max(peaks, default=0.0),
                    "hwm_mib": hwm_mib(server.process.pid) or float("nan"),
                }
        if not args.no_tuning:
            log("tuning: batching knobs side by side")
            run_tuning(report, plan, repository, folder, args.device, args.client_processes, args.server_arg)
    report.elapsed_s = time.monotonic() - started
    checks = evaluate(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The sections other generators wrote (clients.bench.sections: perf_analyzer, scaling's) are kept as they were.
    previous = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(with_sections_of(previous, render(report, checks)))
    if args.json is not None:
        args.json.write_text(json.dumps({**asdict(report), "checks": [asdict(c) for c in checks]}, indent=2))
    log(f"wrote {args.out} in {report.elapsed_s / 60:.1f} min")
    for check in checks:
        verdict = "-" if check.passed is None else ("pass" if check.passed else "MISS")
        print(f"{verdict:5s} {check.name}: {check.detail} -> {fmt(check.ratio, 2)} (goal {check.goal})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
