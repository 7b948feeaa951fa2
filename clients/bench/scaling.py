"""The scaling sections of docs/performance.md (clients.bench.sections): workers, the floors, the peer rig's pass.

    python -m clients.bench.scaling [--out docs/performance.md] workers [--workers 1,2] [--repeats 2] [--duration 5]
        [--server-cpus 0-7 --client-cpus 8-15] [--client-processes N] [--device auto] [--repository DIR]
    python -m clients.bench.scaling [--out docs/performance.md] floors [--repeats 2] [--duration 5]
    python -m clients.bench.scaling [--out docs/performance.md] peers [--results /tmp/peers/results] [--rig-command "..."]

`workers` exports the built-in lstm, starts charrnn-server with each --workers count in turn (alternating the
order on each repeat, so that drift on a shared machine falls on both sides), and drives it with
charrnn-loadgen in this process, one TCP connection per request in flight (a server's workers share
connections out, not requests). Per cell: words/s, p99, server CPU (the supervisor and its workers, psutil)
and client CPU per request. On a machine with cores to spare (a lent GPU machine has 16), --server-cpus and
--client-cpus pin the two apart, and --client-processes spreads the load generator over several processes, so
that what the table shows is the server scaling, not the load generator's one GIL (Makefile: device-workers).

`floors` measures, in the rig's cells, what a request costs a server that does nothing but the transport (the
echo of clients.bench.echo, answering payloads the size of our responses) and one that does the transport plus
one run of the model per request (the echo's --run-model: the model floor, the least any server running this
model in its own process can cost), beside charrnn-server with its defaults; each started in turn, the order
reversed on every repeat, charrnn-loadgen in this process with one connection per request in flight.

`peers` renders the JSON results of the shared rig (../shared/peers) as a table: clients.bench.peer_rig.

Where the servers and the load generator run, and what a load run costs each: clients.bench.placement.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from clients.bench.peer_rig import PEER_CELLS, render_peers
from clients.bench.placement import MeasurePlan, cpu_list, measured_load, tree_cpus, tree_memory_mib
from clients.bench.sections import SECTIONS, now_utc, write_section
from clients.processes import pinned

CELLS = ((1, 8), (1, 64), (32, 8), (32, 64))
"""(words per request, concurrency) of the workers table."""


def _read_back(rows: Sequence[dict[str, object]], plan: MeasurePlan) -> str:
    """Where the pinned servers' processes really were allowed to run, as read from them."""
    placed = sorted({str(r["server_cpus"]) for r in rows if "server_cpus" in r})
    pinned_at_all = plan.server_cpus is not None or plan.client_cpus is not None
    return f" (the server's processes' affinity, read back: {'; '.join(placed)})" if pinned_at_all else ""


# ---- workers ----------------------------------------------------------------------------------------------------


def measure_workers(plan: MeasurePlan) -> list[dict[str, object]]:
    """Every (repeat, workers, cell) measurement, workers order alternating per repeat; each row says which
    execution provider the server reported for the model (the one that really ran)."""
    from clients.bench.environment import export_repository, gpu_memory_used_mib
    from clients.bench.servers import providers_of, start_server
    from clients.loadgen.config import LoadConfig

    rows: list[dict[str, object]] = []
    gpu_before = gpu_memory_used_mib()
    with pinned(plan.client_cpus) as everywhere, tempfile.TemporaryDirectory(prefix="charrnn-scaling-") as scratch:
        folder = Path(scratch)
        cpus = plan.server_cpus if plan.server_cpus is not None else everywhere
        repository = plan.repository if plan.repository is not None else export_repository(folder)
        for repeat in range(plan.repeats):
            order = list(plan.counts) if repeat % 2 == 0 else list(reversed(plan.counts))
            for workers in order:
                server = start_server(f"workers-{workers}-{repeat}", repository, folder, plan.device, True,
                                      ["--workers", str(workers)], cpus=cpus)
                try:
                    provider = providers_of(server).get("lstm", "?")
                    placed = tree_cpus(server.process.pid)
                    time.sleep(1.0)
                    rss, pss = tree_memory_mib(server.process.pid)
                    gpu_used = gpu_memory_used_mib()
                    idle = {"server_rss_mib": rss, "server_pss_mib": pss,
                            "gpu_memory_mib": None if gpu_used is None or gpu_before is None else gpu_used - gpu_before}
                    for words, concurrency in CELLS:
                        config = LoadConfig(server.target, "lstm", concurrency=concurrency,
                                            words_per_request=words, duration_s=plan.duration_s, warmup_s=1.0,
                                            connections=concurrency, processes=plan.client_processes)
                        rows.append({"repeat": repeat, "workers": workers, "words": words,
                                     "concurrency": concurrency, "provider": provider,
                                     "server_cpus": placed, **idle,
                                     **measured_load(server.process.pid, config)})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                finally:
                    server.stop_or_kill()
    return rows


def render_workers(
    rows: Sequence[dict[str, object]], plan: MeasurePlan, command: str, started: str, load_average: Sequence[float],
) -> str:
    """The workers section."""
    from clients.bench.environment import machine_info

    machine = machine_info(plan.device)
    begin, end = SECTIONS["workers"]
    counts = sorted({int(r["workers"]) for r in rows})  # type: ignore[call-overload]
    providers = sorted({str(r.get("provider", "?")) for r in rows})
    lines = [
        begin,
        "## Workers",
        "",
        f"Generated by `{command}` on {started} UTC. Machine: {machine['nproc']} CPUs ({machine['affinity']} usable, "
        f"{machine['cpu_model']}), GPU: {machine['gpu']}, onnxruntime {machine['onnxruntime']}, load average at start "
        f"{', '.join(f'{v:.2f}' for v in load_average)}; {plan.where()}{_read_back(rows, plan)}, and the machine "
        f"was shared with other work. charrnn-server `--device {plan.device} --workers N` with its other defaults, "
        f"model `lstm`, execution provider {', '.join(providers)} (as the server reported it); charrnn-loadgen in "
        f"{plan.load_processes()} with one TCP connection per request in flight (`--connections C`), {plan.duration_s:g} s per cell after "
        f"1 s warm-up; each cell {plan.repeats} time(s), the order of the worker counts alternating. Figures are the "
        "median over the repeats (range in brackets). Server CPU is the supervisor and every worker (psutil), "
        "client CPU the load generator's processes (their start-up included); per request = CPU seconds / requests.",
        "",
        "| workers | words/request | concurrency | words/s | p99 ms | server CPU % | server CPU us/request | client CPU us/request | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    medians: dict[tuple[int, int, int], float] = {}
    for workers in counts:
        for words, concurrency in CELLS:
            cell = [r for r in rows if (r["workers"], r["words"], r["concurrency"]) == (workers, words, concurrency)]
            if not cell:
                continue
            wps = [float(r["words_per_s"]) for r in cell]  # type: ignore[arg-type]
            medians[(workers, words, concurrency)] = statistics.median(wps)
            errors = sum(sum(r["errors"].values()) for r in cell)  # type: ignore[union-attr]
            lines.append(
                f"| {workers} | {words} | {concurrency} | {statistics.median(wps):,.0f} [{min(wps):,.0f}-{max(wps):,.0f}] | "
                f"{statistics.median(float(r['p99_ms']) for r in cell):.1f} | "  # type: ignore[arg-type]
                f"{statistics.median(float(r['server_cpu']) for r in cell) * 100:.0f} | "  # type: ignore[arg-type]
                f"{statistics.median(float(r['server_us_per_request']) for r in cell):,.0f} | "  # type: ignore[arg-type]
                f"{statistics.median(float(r['client_us_per_request']) for r in cell):,.0f} | {errors or '-'} |"  # type: ignore[arg-type]
            )
    if len(counts) > 1:
        base = counts[0]
        lines += ["", f"Words/s against {base} worker(s), per cell (medians):", "",
                  "| workers | " + " | ".join(f"{w} w, c{c}" for w, c in CELLS) + " |",
                  "|---:|" + "---:|" * len(CELLS)]
        for workers in counts[1:]:
            ratios = [medians.get((workers, w, c), float("nan")) / medians.get((base, w, c), float("nan")) for w, c in CELLS]
            lines.append(f"| {workers} | " + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " |")
    lines += _idle_memory(rows, counts)
    lines += ["", end]
    return "\n".join(lines) + "\n"


def _idle_memory(rows: Sequence[dict[str, object]], counts: Sequence[int]) -> list[str]:
    """Each worker count's idle memory (median over its starts), where the rows have it: the server's RSS, all
    its processes, and the GPU memory it took (nvidia-smi's used memory, against before any server started)."""
    measured = [r for r in rows if "server_rss_mib" in r]
    if not measured:
        return []
    lines = ["", "Idle memory, one second after SERVING (median over the starts; the supervisor, where there is one, "
             "is in the sums and shared out per worker):", "",
             "| workers | server RSS MiB (sum over processes) | server PSS MiB (sum) | PSS per worker | "
             "GPU memory taken MiB |", "|---:|---:|---:|---:|---:|"]
    for workers in counts:
        started = {int(r["repeat"]): r for r in measured if r["workers"] == workers}  # type: ignore[call-overload]
        if not started:
            continue
        rss = statistics.median(float(r["server_rss_mib"]) for r in started.values())  # type: ignore[arg-type]
        pss = statistics.median(float(r.get("server_pss_mib", r["server_rss_mib"])) for r in started.values())  # type: ignore[arg-type]
        gpu = [float(r["gpu_memory_mib"]) for r in started.values() if r.get("gpu_memory_mib") is not None]  # type: ignore[arg-type]
        lines.append(f"| {workers} | {rss:,.0f} | {pss:,.0f} | {pss / workers:,.0f} | "
                     f"{f'{statistics.median(gpu):,.0f}' if gpu else '- (no GPU)'} |")
    return lines


# ---- floors -----------------------------------------------------------------------------------------------------

FLOOR_SERVERS = ("echo", "floor", "ours")
FLOOR_TITLES = {"echo": "echo (transport only)", "floor": "echo + one model run per request (model floor)",
                "ours": "**ours** (charrnn-server, defaults)"}
FLOOR_WORD_LENGTH = 5
"""Letters per word in the floors' cells: the rig's words."""


def measure_floors(plan: MeasurePlan) -> list[dict[str, object]]:
    """Every (repeat, server, cell) measurement of the floors section; the first repeat starts with ours (whose
    response sizes the echoes then answer with), and each repeat reverses the order of the one before. The plan
    also says where the servers and the load generator run, and in how many load processes (its counts unused)."""
    from clients.bench.cells import response_bytes
    from clients.bench.environment import export_repository
    from clients.bench.servers import start_echo, start_server
    from clients.loadgen.config import LoadConfig
    from export.manifest import scan_repository

    rows: list[dict[str, object]] = []
    sizes: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="charrnn-floors-") as scratch, pinned(plan.client_cpus) as everywhere:
        folder = Path(scratch)
        repository = plan.repository if plan.repository is not None else export_repository(folder)
        model_folder = scan_repository(repository)["lstm"][-1].path
        cpus = plan.server_cpus if plan.server_cpus is not None else everywhere
        for repeat in range(plan.repeats):
            order = list(reversed(FLOOR_SERVERS)) if repeat % 2 == 0 else list(FLOOR_SERVERS)
            for name in order:
                label = f"{name}-{repeat}"
                if name == "ours":
                    server = start_server(label, repository, folder, plan.device, True, ["--workers", "auto"], cpus=cpus)
                else:
                    server = start_echo(folder, model_folder if name == "floor" else None, label, cpus=cpus)
                try:
                    if name == "ours" and not sizes:
                        sizes = {words: response_bytes(server, "lstm", words, FLOOR_WORD_LENGTH)
                                 for words in sorted({w for w, _ in PEER_CELLS})}
                    time.sleep(1.0)
                    for words, concurrency in PEER_CELLS:
                        config = LoadConfig(
                            server.target, "lstm", concurrency=concurrency, words_per_request=words,
                            word_length=FLOOR_WORD_LENGTH, duration_s=plan.duration_s, warmup_s=1.0,
                            connections=concurrency, echo=name != "ours", echo_response_bytes=sizes.get(words, 0),
                            processes=plan.client_processes,
                        )
                        rows.append({"repeat": repeat, "server": name, "words": words, "concurrency": concurrency,
                                     "response_bytes": sizes.get(words), "server_cpus": tree_cpus(server.process.pid),
                                     **measured_load(server.process.pid, config)})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                finally:
                    server.stop_or_kill()
    return rows


def _median(rows: Sequence[dict[str, object]], server: str, words: int, concurrency: int, key: str) -> float:
    """The median of `key` over the repeats of one server's cell (nan without any)."""
    values = [float(r[key]) for r in rows  # type: ignore[arg-type]
              if (r["server"], r["words"], r["concurrency"]) == (server, words, concurrency)]
    return statistics.median(values) if values else float("nan")


def floors_section(plan: MeasurePlan) -> str:
    """The floors section a placement writes: the rig's conditions (unpinned, one load process) have theirs,
    any other placement the other, so that one run does not replace the other."""
    return "floors" if plan.rigs_conditions() else "floors-pinned"


def render_floors(
    rows: Sequence[dict[str, object]], plan: MeasurePlan, command: str, started: str, load_average: Sequence[float],
) -> str:
    """The floors section: per cell, server CPU per request and words/s of the echo, the model floor and ours,
    and the ratios the performance targets are stated in; the plan says where they ran."""
    from clients.bench.environment import machine_info

    machine = machine_info("cpu")
    begin, end = SECTIONS[floors_section(plan)]
    servers = [name for name in FLOOR_SERVERS if any(r["server"] == name for r in rows)]
    header = " | ".join(f"{w} w, c{c}" for w, c in PEER_CELLS)
    rule = "|---|" + "---:|" * len(PEER_CELLS)

    def table(key: str, fmt: str) -> list[str]:
        return [f"| {FLOOR_TITLES[name]} | " + " | ".join(
            format(_median(rows, name, w, c, key), fmt) for w, c in PEER_CELLS) + " |" for name in servers]

    def ratio(top: str, bottom: str, key: str) -> str:
        return " | ".join(f"{_median(rows, top, w, c, key) / _median(rows, bottom, w, c, key):.2f}" for w, c in PEER_CELLS)

    errors = sum(sum(r["errors"].values()) for r in rows)  # type: ignore[union-attr]
    lines = [
        begin,
        "## Floors: the transport alone, the transport plus the model's run, and ours"
        + ("" if plan.rigs_conditions() else ", placed otherwise"),
        "",
        f"Generated by `{command}` on {started} UTC. Machine: {machine['nproc']} CPUs ({machine['affinity']} usable, "
        f"{machine['cpu_model']}), load average at start {', '.join(f'{v:.2f}' for v in load_average)}; "
        f"{plan.where().replace('the server', 'each server')}{_read_back(rows, plan)}. Three servers, each started in turn (the order reversed on "
        "every repeat): the echo of `clients.bench.echo` (grpc.aio, a generic handler answering a fixed payload "
        "the size of our response to the same request: the transport alone), the same echo with `--run-model` "
        "(plus one run of the exported `lstm` per request through the server's own ModelRuntime.run, one-hot "
        "included, on the event loop, and nothing else: no parsing, no checks, no response built; the least a "
        "server running this model in its own process, one run per request, can cost; one merging requests "
        "shares a run's fixed cost between them, as ours does at 32 words and concurrency 8 and 64, but each "
        "word still costs its share of the run), and charrnn-server with its defaults "
        f"(`--workers auto`). charrnn-loadgen in {plan.load_processes()}, one connection per request in flight, "
        f"{FLOOR_WORD_LENGTH}-letter words as in the rig, {plan.duration_s:g} s per cell after 1 s warm-up, "
        f"{plan.repeats} repeat(s); medians over the repeats. Errors: {errors or 'none'}.",
        "",
        "Server CPU per request (all its processes, psutil; CPU seconds / requests), us:",
        "",
        f"| server | {header} |",
        rule,
        *table("server_us_per_request", ",.0f"),
        "",
        "words/s:",
        "",
        f"| server | {header} |",
        rule,
        *table("words_per_s", ",.0f"),
        "",
        "Ratios per cell:",
        "",
        f"| ratio | {header} |",
        rule,
    ]
    if "floor" in servers and "echo" in servers:
        lines.append("| model floor / echo, server CPU per request: the least a server running the model "
                     f"in its own process, one run per request, can reach (target for ours <= 1.3) | {ratio('floor', 'echo', 'server_us_per_request')} |")
    if "ours" in servers and "echo" in servers:
        lines.append(f"| ours / echo, server CPU per request | {ratio('ours', 'echo', 'server_us_per_request')} |")
    if "ours" in servers and "floor" in servers:
        lines.append(f"| ours / model floor, server CPU per request | {ratio('ours', 'floor', 'server_us_per_request')} |")
        lines.append(f"| ours / model floor, words/s | {ratio('ours', 'floor', 'words_per_s')} |")
    lines += ["", end]
    return "\n".join(lines) + "\n"


# ---- command line -----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of the generators and write its section."""
    parser = argparse.ArgumentParser(prog="python -m clients.bench.scaling", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    commands = parser.add_subparsers(dest="command", required=True)
    workers = commands.add_parser("workers", help="measure --workers counts side by side")
    workers.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    floors = commands.add_parser("floors", help="measure the echo, the model floor and ours side by side")
    for measured in (workers, floors):
        measured.add_argument("--repeats", type=int, default=2)
        measured.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
        measured.add_argument("--device", default="cpu")
        measured.add_argument("--server-cpus", type=cpu_list, default=None,
                              help="pin the server (and its workers) to these CPUs, e.g. 0-7 (default: unpinned)")
        measured.add_argument("--client-cpus", type=cpu_list, default=None,
                              help="pin the load generator to these CPUs, e.g. 8-15 (default: unpinned)")
        measured.add_argument("--client-processes", type=int, default=1,
                              help="load-generator processes (one tops out near 4k requests/s)")
        measured.add_argument("--repository", type=Path, default=None,
                              help="serve this exported repository instead of exporting the built-ins (no torch)")
        measured.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    peers = commands.add_parser("peers", help="render the shared peer rig's results")
    peers.add_argument("--results", type=Path, default=Path("/tmp/peers/results"))
    peers.add_argument("--rig-command",
                       default="CHARRNN_PROJECT=$PWD bash ../shared/peers/run_all.sh inproc echo ours torchserve")
    peers.add_argument("--note", default="The machine (2 CPUs) was shared with other work during the pass.")
    args = parser.parse_args(argv)
    command = "python -m clients.bench.scaling " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    plan = MeasurePlan()
    if args.command in ("workers", "floors"):
        counts = tuple(int(value) for value in args.workers.split(",")) if args.command == "workers" else ()
        plan = MeasurePlan(counts, args.repeats, args.duration, args.device, args.server_cpus, args.client_cpus,
                           args.client_processes, args.repository)
    if args.command == "workers":
        started, load_average = now_utc(), os.getloadavg()
        rows = measure_workers(plan)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2))
        write_section(args.out, "workers", render_workers(rows, plan, command, started, load_average))
    elif args.command == "floors":
        started, load_average = now_utc(), os.getloadavg()
        rows = measure_floors(plan)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2))
        write_section(args.out, floors_section(plan),
               render_floors(rows, plan, command, started, load_average))
    else:
        write_section(args.out, "peers", render_peers(args.results, args.rig_command, args.note))
    print(f"wrote the {floors_section(plan) if args.command == 'floors' else args.command} section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
