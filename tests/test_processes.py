"""clients/processes.py: the one helper that starts port-file servers for the tests, the benchmark and the soak."""

from __future__ import annotations

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
