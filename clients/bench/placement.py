"""Where a measured server and its load generator run, and what one load run costs each of them.

A MeasurePlan says which CPUs the server (its supervisor and workers) and the load generator (this process and
the load processes it spawns) may use, and how many load processes there are. Unpinned, both share every core,
as on the 2-core development machine; pinned apart (a machine with cores to spare, a lent GPU machine's 16),
the load generator's CPU no longer competes with the server's. measured_load() runs one charrnn-loadgen load
and books the CPU both sides spent on it; the tree_* functions read a server's processes from outside.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

    from clients.loadgen.config import LoadConfig


def cpu_list(text: str) -> frozenset[int]:
    """A CPU list as taskset and cpusets write it ("0-7,12"), each CPU one this process may use (an argparse
    type: a bad list is an ArgumentTypeError naming it)."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            low, high = int(first), int(last or first)
            if high < low:
                raise ValueError(part)
            cpus.update(range(low, high + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list (like 0-7,12): {text[:40]!r}") from None
    usable = os.sched_getaffinity(0)
    if not cpus or not cpus <= usable:
        raise argparse.ArgumentTypeError(
            f"{cpus_named(frozenset(cpus - usable) or frozenset(cpus))} not usable here "
            f"(usable: {cpus_text(frozenset(usable))})"
        )
    return frozenset(cpus)


def cpus_text(cpus: frozenset[int]) -> str:
    """A CPU set as a CPU list ("0-7,12")."""
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and cpu == int(ranges[-1].rpartition("-")[2]) + 1:
            ranges[-1] = f"{ranges[-1].partition('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)


def cpus_named(cpus: frozenset[int]) -> str:
    """"CPU 3" or "CPUs 0-7"."""
    return f"CPU{'s' if len(cpus) > 1 else ''} {cpus_text(cpus)}"


@dataclass(frozen=True)
class MeasurePlan:
    """What `workers` and `floors` (clients.bench.scaling) measure and where: the worker counts (workers only),
    the repeats, and the CPUs the servers and the load generator run on."""

    counts: tuple[int, ...] = (1, 2)
    repeats: int = 2
    duration_s: float = 5.0
    device: str = "cpu"
    server_cpus: frozenset[int] | None = None
    """The server's CPUs (its workers' too; `--workers auto` counts them); None: all of this process's."""
    client_cpus: frozenset[int] | None = None
    """The load generator's CPUs (this process and its load processes); None: all of this process's."""
    client_processes: int = 1
    """Load-generator processes (charrnn-loadgen --processes): one Python process tops out near 4k requests/s."""
    repository: Path | None = None
    """An exported model repository to serve; None: export the built-ins first (needs torch)."""

    def rigs_conditions(self) -> bool:
        """Placed as in the shared rig: nothing pinned, one load-generator process."""
        return self.server_cpus is None and self.client_cpus is None and self.client_processes == 1

    def where(self) -> str:
        """The placement, in words, for a section."""
        if self.server_cpus is None and self.client_cpus is None:
            return "the load generator shares the cores with the server"
        server = "on all CPUs" if self.server_cpus is None else f"pinned to {cpus_named(self.server_cpus)}"
        client = "on all CPUs" if self.client_cpus is None else f"pinned to {cpus_named(self.client_cpus)}"
        shared = self.server_cpus is None or self.client_cpus is None or bool(self.server_cpus & self.client_cpus)
        return f"the server {server}, the load generator {client}" + (" (shared)" if shared else " (cores of its own)")

    def load_processes(self) -> str:
        """The load generator's processes, in words."""
        return f"{self.client_processes} processes" if self.client_processes > 1 else "one process"


def _tree(pid: int) -> Iterator[psutil.Process]:
    """A process and its children, recursively."""
    import psutil

    root = psutil.Process(pid)
    yield root
    yield from root.children(recursive=True)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children."""
    import psutil

    total = 0.0
    for process in _tree(pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def tree_cpus(pid: int) -> str:
    """The CPUs a process and its children may run on, as a CPU list: where the server really is."""
    import psutil

    cpus: set[int] = set()
    for process in _tree(pid):
        try:
            cpus.update(process.cpu_affinity())
        except psutil.NoSuchProcess:
            continue
    return cpus_text(frozenset(cpus))


def tree_memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process and its children, summed, MiB. RSS counts the libraries they share (onnxruntime,
    CUDA's) once per process; PSS shares them out, so its sum is what they take together."""
    import psutil

    rss = pss = 0
    for process in _tree(pid):
        try:
            memory = process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss += memory.rss
        pss += getattr(memory, "pss", memory.rss)
    return rss / 2**20, pss / 2**20


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for (the load processes of a
    finished run_load; a server still running is not among them)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measured_load(pid: int, config: LoadConfig) -> dict[str, object]:
    """One charrnn-loadgen run against the server process `pid` (and its children): words/s, p99, errors, and
    server and client (this process and the load processes it spawned and reaped) CPU per request and while
    under load.

    Per request is the CPU the whole run took over every request it sent, warm-up included: the run also
    spends time with no load at all (starting load processes, their barrier), which would dilute a CPU share
    taken over its wall time. The share of a core under load is then that per request times the measured
    requests/s. The client's figure includes the load processes' start-up (the interpreter, imports)."""
    from clients.loadgen.fanout import run_load

    cpu_before, own_before = tree_cpu_s(pid), _own_cpu_s()
    result = run_load(config)
    sent = max(result.issued, 1)
    server_s = (tree_cpu_s(pid) - cpu_before) / sent
    client_s = (_own_cpu_s() - own_before) / sent
    return {
        "words_per_s": result.words_per_s, "requests_per_s": result.requests_per_s,
        "p99_ms": result.latency_ms["p99"], "errors": result.errors,
        "server_cpu": server_s * result.requests_per_s, "client_cpu": client_s * result.requests_per_s,
        "server_us_per_request": server_s * 1e6, "client_us_per_request": client_s * 1e6,
    }
