"""The model lifecycle across real processes: charrnn-server subprocesses on 127.0.0.1, SIGHUP, real gRPC.

- Under load, a new version is exported (charrnn-export's own export_model) and the server gets SIGHUP:
  no request fails, every response is exactly the old or the new version's result as its version field
  says, and once the new version has answered only it answers.
- The same with a corrupt new version: no failures, the old version keeps answering, the failure is
  visible in GetModel and counted on /metrics.
- Removing a model under load: requests in flight finish, later ones get NOT_FOUND naming the loaded models.
- charrnn-batch over one stream during several reloads: complete, ordered output, each record naming the
  version that encoded it, with that version's values.
Every loop is bounded in time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import CharRnnClient, CharRnnError, Encoding
from clients.processes import ServerProcess
from export.manifest import ONNX_FILE
from export.models import BUILTIN_SPECS, seeded_model
from export.repository import export_model
from server.core.runtime import ModelRuntime
from tests.helpers import console_script, start_server

pytestmark = pytest.mark.e2e

WORDS = ["hello", "h", "oleh", "hell", "lo"]
DEADLINE_S = 60.0


def reference(folder: Path, name: str, words: list[str]) -> list[np.ndarray]:
    """Each word's outputs from an onnxruntime session of that version folder, run alone."""
    model = ModelRuntime(folder, "cpu", name=name)
    results = []
    for word in words:
        h0 = model.zero_state(1)
        outputs = model.run(model.alphabet.indices([word]), h0, np.zeros_like(h0) if model.manifest.has_cell_state else None)
        results.append(outputs.outputs[0, : len(word)])
    return results


class Load:
    """A client thread encoding WORDS continuously, keeping every response (or error) in order."""

    def __init__(self, target: str, model: str, own_connection: bool = False) -> None:
        self.target, self.model, self.own_connection = target, model, own_connection
        self.responses: list[list[Encoding]] = []
        self.errors: list[CharRnnError] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with CharRnnClient(self.target, own_connection=self.own_connection) as client:
            started = time.monotonic()
            while not self._stop.is_set() and time.monotonic() - started < DEADLINE_S:
                try:
                    self.responses.append(client.encode(self.model, WORDS))
                except CharRnnError as error:
                    self.errors.append(error)

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            assert self._thread.is_alive(), "the load thread stopped"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(DEADLINE_S)

    def versions(self) -> list[int]:
        return [response[0].version for response in self.responses]


class HealthWatch:
    """Every status grpc.health.v1 Watch streams for the whole server, collected on a thread: a NOT_SERVING blip
    during a reload would show here, however short."""

    def __init__(self, target: str) -> None:
        self.statuses: list[int] = []
        self._channel = grpc.insecure_channel(target)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=DEADLINE_S
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for response in self._call:
                self.statuses.append(response.status)
        except grpc.RpcError:
            pass  # cancelled by stop()

    def stop(self) -> list[str]:
        """Stop watching; the status names seen, in order."""
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()
        return [health_pb2.HealthCheckResponse.ServingStatus.Name(status) for status in self.statuses]


def repository_with(tmp_path: Path, model_repository: Path, *names: str) -> Path:
    repo = tmp_path / "repo"
    for name in names:
        shutil.copytree(model_repository / name, repo / name)
    return repo


def hup(server: ServerProcess) -> None:
    server.process.send_signal(signal.SIGHUP)


def metrics_text(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def output_lines(path: Path) -> int:
    """Complete lines charrnn-batch has written so far."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("workers", [1, 2])
def test_export_and_sighup_under_load_swaps_exactly(tmp_path: Path, model_repository: Path, workers: int) -> None:
    """With --workers 2 the load runs on four connections of their own (spread over both workers): SIGHUP reaches
    every worker, and on each connection the swap is exact and one-way."""
    repo = repository_with(tmp_path, model_repository, "rnn")
    expected = {1: reference(repo / "rnn" / "1", "rnn", WORDS)}
    server = start_server(repo, tmp_path, "--workers", str(workers))
    try:
        loads = [Load(server.target, "rnn", own_connection=workers > 1) for _ in range(1 if workers == 1 else 4)]
        for load in loads:
            load.wait_for(lambda load=load: len(load.responses) >= 20, "responses from version 1")
        if workers > 1:
            spread = [sum(1 for c in worker.net_connections("tcp") if c.laddr.port == server.port)
                      for worker in psutil.Process(server.process.pid).children()]
            assert len(spread) == 2 and min(spread) > 0, f"the loads' connections per worker: {spread}"
        health = HealthWatch(server.target)
        export_model(seeded_model(BUILTIN_SPECS["rnn"], seed=5), repo)  # the default: version 2
        expected[2] = reference(repo / "rnn" / "2", "rnn", WORDS)
        hup(server)
        for load in loads:
            load.wait_for(lambda load=load: 2 in load.versions(), "version 2 to answer")
            seen = len(load.responses)
            load.wait_for(lambda load=load, seen=seen: len(load.responses) >= seen + 20, "responses after the swap")
        for load in loads:
            load.stop()
        assert health.stop() == ["SERVING"], "health left SERVING during the reload"
        for load in loads:
            assert load.errors == []
            versions = load.versions()
            first_new = versions.index(2)
            assert set(versions[:first_new]) == {1} and set(versions[first_new:]) == {2}, "an old answer after the swap"
            for response in load.responses:
                version = response[0].version
                assert {encoding.version for encoding in response} == {version}
                for encoding, want in zip(response, expected[version], strict=True):
                    np.testing.assert_allclose(encoding.outputs, want, rtol=0, atol=1e-6)
        assert not np.allclose(expected[1][0], expected[2][0])
        with CharRnnClient(server.target) as client:
            assert [(v.version, v.state, v.default) for v in client.model("rnn").versions] == [(2, "ready", True)]
            assert client.health() == "SERVING"
        assert 'charrnn_requests_total{code="OK",method="Encode",model="rnn",version="2"}' in metrics_text(server)
        assert 'charrnn_model_default_version{model="rnn"} 2.0' in metrics_text(server)
        assert server.log().count("server.main: reload done") == workers, "SIGHUP did not reach every worker"
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_corrupt_new_version_under_load_keeps_the_old_one_answering(
    tmp_path: Path, model_repository: Path, workers: int
) -> None:
    """With --workers 2 each worker refuses the version: the refusal counter sums both."""
    repo = repository_with(tmp_path, model_repository, "lstm")
    expected = reference(repo / "lstm" / "1", "lstm", WORDS)
    server = start_server(repo, tmp_path, "--workers", str(workers))
    try:
        load = Load(server.target, "lstm")
        load.wait_for(lambda: len(load.responses) >= 20, "responses from version 1")
        staging = repo / "lstm" / ".incoming"
        shutil.copytree(repo / "lstm" / "1", staging)
        data = bytearray((staging / ONNX_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (staging / ONNX_FILE).write_bytes(bytes(data))
        staging.rename(repo / "lstm" / "2")
        hup(server)
        with CharRnnClient(server.target) as client:
            load.wait_for(lambda: any(v.state == "failed" for v in client.model("lstm").versions), "the refusal")
            seen = len(load.responses)
            load.wait_for(lambda: len(load.responses) >= seen + 20, "responses after the refusal")
            load.stop()
            versions = client.model("lstm").versions
            assert [(v.version, v.state, v.default) for v in versions] == [(1, "ready", True), (2, "failed", False)]
            assert "sha256" in versions[1].error
            assert client.health() == "SERVING"
        assert load.errors == []
        assert set(load.versions()) == {1}
        for response in load.responses:
            for encoding, want in zip(response, expected, strict=True):
                np.testing.assert_allclose(encoding.outputs, want, rtol=0, atol=1e-6)
        wait_until = time.monotonic() + DEADLINE_S
        while server.log().count("lstm version 2 refused") < workers:
            assert time.monotonic() < wait_until, "a worker did not refuse the corrupt version"
            time.sleep(0.05)
        assert f'charrnn_model_load_failures_total{{model="lstm",version="2"}} {float(workers)}' in metrics_text(server)
    finally:
        assert server.stop() == 0, server.log()


def test_removing_a_model_under_load_finishes_in_flight_then_not_found(tmp_path: Path, model_repository: Path) -> None:
    repo = repository_with(tmp_path, model_repository, "rnn", "lstm")
    server = start_server(repo, tmp_path)
    try:
        loads = [Load(server.target, "lstm") for _ in range(3)]
        for load in loads:
            load.wait_for(lambda load=load: len(load.responses) >= 10, "responses")
        shutil.move(repo / "lstm", tmp_path / "lstm-removed")
        hup(server)
        for load in loads:
            load.wait_for(lambda load=load: len(load.errors) >= 5, "NOT_FOUND answers")
            load.stop()
        for load in loads:
            # Every request before the removal was answered; every error is the NOT_FOUND after it.
            assert {(e.code.name, e.reason) for e in load.errors} == {("NOT_FOUND", "MODEL_NOT_FOUND")}
            assert all("(models: rnn)" in e.details for e in load.errors)
        with CharRnnClient(server.target) as client:
            assert [m.name for m in client.models()] == ["rnn"]
            assert client.health() == "SERVING"
    finally:
        assert server.stop() == 0, server.log()


def test_charrnn_batch_over_a_stream_during_several_reloads(tmp_path: Path, model_repository: Path) -> None:
    repo = repository_with(tmp_path, model_repository, "lstm")
    prepared = tmp_path / "prepared"  # versions 2 and 3, exported beforehand, moved in while the job runs
    for version, seed in ((2, 11), (3, 12)):
        export_model(seeded_model(BUILTIN_SPECS["lstm"], seed=seed), prepared, version)
    words = ["".join("helo"[(i * 7 + j) % 4] for j in range(1 + i % 9)) for i in range(20000)]
    expected = {
        1: reference(repo / "lstm" / "1", "lstm", words[:40]),
        2: reference(prepared / "lstm" / "2", "lstm", words[:40]),
        3: reference(prepared / "lstm" / "3", "lstm", words[:40]),
    }
    source = tmp_path / "words.txt"
    source.write_text("\n".join(words) + "\n")
    output = tmp_path / "out.jsonl"
    server = start_server(repo, tmp_path, "--keep-versions", "1")
    try:
        job = subprocess.Popen(
            [console_script("charrnn-batch"), "--target", server.target, "--model", "lstm", "--input", str(source),
             "--output", str(output), "--chunk-size", "8", "--max-in-flight", "2", "--streams", "1", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
        )
        for version in (2, 3):
            # Each reload once the job has written more records (so it falls inside the job), bounded in time.
            lines = output_lines(output)
            deadline = time.monotonic() + DEADLINE_S
            while output_lines(output) < lines + 200 and job.poll() is None:
                assert time.monotonic() < deadline, "charrnn-batch made no progress"
                time.sleep(0.01)
            (prepared / "lstm" / str(version)).rename(repo / "lstm" / str(version))
            hup(server)
        stdout, stderr = job.communicate(timeout=120)
        assert job.returncode == 0, stderr
    finally:
        assert server.stop() == 0, server.log()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["index"] for record in records] == list(range(len(words)))
    assert [record["word"] for record in records] == words
    assert all("error" not in record for record in records)
    versions = [record["version"] for record in records]
    assert versions == sorted(versions), "an older version answered after a newer one"
    assert versions[0] == 1 and versions[-1] == 3, f"the reloads happened outside the job: {sorted(set(versions))}"
    for record in records:
        position = record["index"] % 40
        if record["word"] == words[position]:  # the words repeat with period 4 x 9: compare where known
            np.testing.assert_allclose(
                np.asarray(record["outputs"]), expected[record["version"]][position], rtol=0, atol=1e-6
            )


def test_poll_seconds_picks_up_a_new_version_without_a_signal(tmp_path: Path, model_repository: Path) -> None:
    repo = repository_with(tmp_path, model_repository, "rnn")
    server = start_server(repo, tmp_path, "--poll-seconds", "0.2")
    try:
        load = Load(server.target, "rnn")
        load.wait_for(lambda: len(load.responses) >= 5, "responses from version 1")
        export_model(seeded_model(BUILTIN_SPECS["rnn"], seed=6), repo)  # version 2; no SIGHUP
        expected = reference(repo / "rnn" / "2", "rnn", WORDS)
        load.wait_for(lambda: 2 in load.versions(), "the poll to load version 2")
        load.stop()
        assert load.errors == []
        last = load.responses[-1]
        assert {encoding.version for encoding in last} == {2}
        for encoding, want in zip(last, expected, strict=True):
            np.testing.assert_allclose(encoding.outputs, want, rtol=0, atol=1e-6)
        assert "SIGHUP" not in server.log()
    finally:
        assert server.stop() == 0, server.log()
