"""clients/processes.py: the one helper that starts port-file servers for the tests, the benchmark and the soak."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from clients.processes import spawn

pytestmark = pytest.mark.unit  # plain Python subprocesses stand in for servers: no torch, no charrnn-server


def test_a_process_that_exits_before_serving_is_an_error_with_its_output(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('no models here'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)fake exited with 3:.*no models here"):
        spawn("fake", command, tmp_path / "ports.json", tmp_path / "fake.log", timeout=30)


def test_a_process_that_never_serves_is_killed_after_the_timeout(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(TimeoutError, match="slow did not start in 0.5 s"):
        spawn("slow", command, tmp_path / "ports.json", tmp_path / "slow.log", timeout=0.5)


def test_ports_are_read_and_stop_returns_the_exit_status(tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    script = (
        "import json, signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        f"pathlib.Path({str(port_file)!r}).write_text(json.dumps({{'port': 4321, 'metrics_port': 9876}}))\n"
        "time.sleep(60)\n"
    )
    server = spawn("ok", [sys.executable, "-c", script], port_file, tmp_path / "ok.log", timeout=30)
    assert (server.target, server.metrics_port) == ("127.0.0.1:4321", 9876)
    assert server.stop() == 0


def test_a_pinned_process_and_what_it_starts_run_on_the_cpus_asked_for_and_ours_stay_as_they_were(
    tmp_path: Path,
) -> None:
    ours = os.sched_getaffinity(0)
    if len(ours) < 2:
        pytest.skip("pinning to one CPU is only visible with two usable CPUs (the CI machine has 2)")
    cpu = max(ours)
    port_file = tmp_path / "ports.json"
    script = (
        "import json, os, pathlib, subprocess, sys\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'],\n"
        "                       capture_output=True, text=True).stdout.strip()\n"
        f"pathlib.Path({str(port_file)!r}).write_text(json.dumps(\n"
        "    {'port': 1, 'own': sorted(os.sched_getaffinity(0)), 'child': child}))\n"
    )
    server = spawn("pinned", [sys.executable, "-c", script], port_file, tmp_path / "pinned.log", timeout=30,
                   cpus={cpu})
    server.process.wait(30)
    seen = json.loads(port_file.read_text())
    assert seen["own"] == [cpu] and seen["child"] == f"[{cpu}]"
    assert os.sched_getaffinity(0) == ours
