"""charrnn-loadgen against a real server (and the echo server of clients.bench.echo): the report's fields, and its
request counts against the server's own charrnn_requests_total."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.loadgen.config import LoadConfig
from clients.loadgen.fanout import run_load
from clients.processes import spawn
from tests.helpers import ServerProcess, console_script, start_server

pytestmark = pytest.mark.e2e  # every test drives a server process (charrnn-server or the echo)

LATENCY_FIELDS = ("p50", "p90", "p99", "mean", "max")
FIELDS = (
    "mode", "target", "model", "concurrency", "words_per_request", "word_length", "processes", "duration_s",
    "requests", "words", "issued", "warmup_requests", "errors", "retryable_errors", "requests_per_s", "words_per_s",
    "latency_ms", "response_bytes",
)


@pytest.fixture(scope="module")
def own_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of this module's own, so that its request counters hold only this module's traffic."""
    running = start_server(model_repository, tmp_path_factory.mktemp("loadgen"))
    yield running
    assert running.stop() == 0, running.log()


def requests_total(server: ServerProcess, method: str) -> float:
    """charrnn_requests_total summed over models and codes, for one method."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "charrnn_requests"
        for sample in family.samples
        if sample.name == "charrnn_requests_total" and sample.labels["method"] == method
    )


def loadgen(*args: str) -> dict[str, object]:
    completed = subprocess.run(
        [console_script("charrnn-loadgen"), *args, "--json"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    report: dict[str, object] = json.loads(completed.stdout)
    return report


def check_report(report: dict[str, object], words_per_request: int) -> None:
    assert set(FIELDS) <= set(report)
    assert report["errors"] == {}
    requests = report["requests"]
    assert isinstance(requests, int) and requests > 0
    assert report["words"] == requests * words_per_request
    assert report["requests_per_s"] > 0  # type: ignore[operator]
    assert report["words_per_s"] == pytest.approx(report["requests_per_s"] * words_per_request)  # type: ignore[operator]
    latency = report["latency_ms"]
    assert isinstance(latency, dict) and set(LATENCY_FIELDS) <= set(latency)
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


def test_unary_for_a_second_reports_throughput_latency_and_matching_counts(own_server: ServerProcess) -> None:
    before = requests_total(own_server, "Encode")
    report = loadgen(
        "--target", own_server.target, "--model", "lstm", "--concurrency", "4", "--words-per-request", "3",
        "--duration", "1", "--warmup", "0.2",
    )
    check_report(report, 3)
    assert report["mode"] == "unary" and report["concurrency"] == 4 and report["processes"] == 1
    assert 0.9 <= report["duration_s"] <= 1.5  # type: ignore[operator]
    assert report["response_bytes"] > 0  # type: ignore[operator]
    # Every RPC the load generator sent (warm-up and the tail after the window included) reached the server.
    assert requests_total(own_server, "Encode") - before == report["issued"]
    assert report["issued"] >= report["requests"] + report["warmup_requests"]  # type: ignore[operator]


def test_stream_over_two_processes_sends_exactly_the_requested_count(own_server: ServerProcess) -> None:
    before = requests_total(own_server, "EncodeStream")
    report = loadgen(
        "--target", own_server.target, "--model", "rnn", "--concurrency", "4", "--words-per-request", "2",
        "--requests", "200", "--warmup", "0", "--stream", "--processes", "2",
    )
    check_report(report, 2)
    assert report["mode"] == "stream" and report["processes"] == 2
    assert report["requests"] == report["issued"] == 200 and report["warmup_requests"] == 0
    assert requests_total(own_server, "EncodeStream") - before == 200  # one count per stream message


def test_refusals_are_counted_by_code_and_reason(model_repository: Path, tmp_path: Path) -> None:
    server = start_server(model_repository, tmp_path, "--max-words", "2")
    try:
        report = run_load(
            LoadConfig(server.target, "lstm", concurrency=2, words_per_request=3, requests=10, warmup_s=0)
        )
    finally:
        assert server.stop() == 0, server.log()
    assert report.requests == 0 and report.errors == {"RESOURCE_EXHAUSTED/TOO_MANY_WORDS": 10}
    assert report.retryable_errors == 0  # the request itself is too large: sending it again cannot help
    assert "errors: 10 RESOURCE_EXHAUSTED/TOO_MANY_WORDS (0 retryable)" in report.summary()


def test_unknown_model_is_a_clear_error(own_server: ServerProcess) -> None:
    completed = subprocess.run(
        [console_script("charrnn-loadgen"), "--target", own_server.target, "--model", "nope", "--duration", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 1
    assert "NOT_FOUND: model 'nope' is not loaded" in completed.stderr


@pytest.mark.parametrize(
    "start", [["-m", "clients.bench.echo"], ["-m", "clients.loadgen", "--serve-echo"]], ids=["bench.echo", "serve-echo"]
)
def test_echo_server_answers_with_the_payload_size_asked_for(tmp_path: Path, start: list[str]) -> None:
    port_file = tmp_path / "echo.json"
    command = [sys.executable, *start, "--port-file", str(port_file)]
    echo = spawn("echo", command, port_file, tmp_path / "echo.log", timeout=30)
    try:
        target = echo.target
        for stream in (False, True):
            report = run_load(
                LoadConfig(target, "lstm", concurrency=3, words_per_request=5, requests=60, warmup_s=0,
                           stream=stream, echo=True, echo_response_bytes=1234)
            )
            assert report.mode == ("echo-stream" if stream else "echo")
            assert report.requests == 60 and report.errors == {} and report.response_bytes == 1234
    finally:
        assert echo.stop() == 0, echo.log()


def test_the_model_floor_runs_the_model_and_answers_like_the_echo(model_repository: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "floor.json"
    command = [sys.executable, "-m", "clients.bench.echo", "--port-file", str(port_file),
               "--run-model", str(model_repository / "lstm" / "1")]
    floor = spawn("floor", command, port_file, tmp_path / "floor.log", timeout=60)
    try:
        report = run_load(LoadConfig(floor.target, "lstm", concurrency=3, words_per_request=4, requests=60,
                                     warmup_s=0, echo=True, echo_response_bytes=321))
        assert report.requests == 60 and report.errors == {} and report.response_bytes == 321
    finally:
        assert floor.stop() == 0, floor.log()
    assert "model floor: 60 runs" in floor.log()


def test_the_model_floor_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "clients.bench.echo", "--run-model", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 1
    assert f"--run-model {tmp_path}: not a loadable model version folder" in completed.stderr
    assert "Traceback" not in completed.stderr
