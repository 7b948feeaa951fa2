"""The server's life as an operator sees it: start-up (health, reflection, device choice, refusals), settings from
the environment, Prometheus metrics, and the SIGTERM drain (in-flight work completes, the grace period bounds it).
Every test talks to a real charrnn-server subprocess; one also checks that the serving path never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from clients.client import CharRnnClient
from clients.errors import error_from_rpc
from export.models import BUILTIN_SPECS, load_checkpoint, seeded_model
from export.trace import PARITY_TOLERANCE, eager_word
from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from tests.helpers import (
    CHANNEL_OPTIONS,
    LARGE_ALPHABET,
    LARGE_MODEL,
    ServerProcess,
    console_script,
    free_port,
    start_server,
)

pytestmark = pytest.mark.e2e

MODELS = ("large_lstm", "lstm", "rnn", "rnn_multi_layers")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- helpers -------------------------------------------------------------------------------------------------------


def health_status(channel: grpc.Channel, service: str = "") -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(response.status)


def long_words(count: int, seed: int, length: int = 64) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list(LARGE_ALPHABET))
    return ["".join(rng.choice(letters, size=length)) for _ in range(count)]


def run_refused(repository: Path, *extra_args: str) -> subprocess.CompletedProcess[str]:
    """Run charrnn-server where it must refuse to start; it must exit by itself."""
    command = [
        console_script("charrnn-server"), "--repository", str(repository), "--address", "127.0.0.1",
        "--port", "0", "--metrics-port", "-1", *extra_args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


def metric_samples(server: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the server's /metrics, keyed by (sample name, labels)."""
    assert server.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass(frozen=True)
class CudaProbe:
    works: bool
    why: str


@pytest.fixture(scope="module")
def cuda_probe(model_repository: Path) -> CudaProbe:
    """Whether onnxruntime's CUDA provider really starts here (it falls back to CPU silently otherwise)."""
    script = (
        "import sys, onnxruntime\n"
        "available = onnxruntime.get_available_providers()\n"
        f"if {CUDA!r} not in available:\n"
        "    print('this onnxruntime has no CUDAExecutionProvider (available: ' + ', '.join(available) + ')')\n"
        "    sys.exit(3)\n"
        f"session = onnxruntime.InferenceSession(sys.argv[1], providers=[{CUDA!r}, {CPU!r}])\n"
        "print(session.get_providers()[0])\n"
    )
    probe = subprocess.run(
        [sys.executable, "-c", script, str(model_repository / "rnn" / "1" / "model.onnx")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if probe.returncode == 0 and probe.stdout.strip() == CUDA:
        return CudaProbe(True, "")
    if probe.returncode == 3:
        return CudaProbe(False, probe.stdout.strip())
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", probe.stderr)
    detail = next((line.strip() for line in stderr.splitlines() if "error" in line.lower()), stderr.strip()[-300:])
    library = re.search(r"Failed to load library (\S+) with error: (.*)", detail)
    if library is not None:
        detail = f"{Path(library.group(1)).name} does not load ({library.group(2).strip()})"
    return CudaProbe(False, f"the session fell back to {probe.stdout.strip() or 'nothing'}: {detail}")


# ---- health, reflection ---------------------------------------------------------------------------------------------


def test_health_is_serving_after_start(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        assert health_status(channel) == SERVING
        assert health_status(channel, "charrnn.v1.CharRnn") == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health_status(channel, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with CharRnnClient(server.target) as client:
        assert client.health() == "SERVING"
        assert client.health("charrnn.v1.CharRnn") == "SERVING"


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"charrnn.v1.CharRnn", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        pool = DescriptorPool(database)
        charrnn = pool.FindServiceByName("charrnn.v1.CharRnn")
        assert [method.name for method in charrnn.methods] == ["Encode", "EncodeStream", "ListModels", "GetModel"]
        encode_stream = charrnn.methods_by_name["EncodeStream"]
        assert encode_stream.input_type.full_name == "charrnn.v1.EncodeRequest"
        assert encode_stream.output_type.full_name == "charrnn.v1.EncodeResponse"
        assert pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Watch"].name == "Watch"


def test_not_serving_while_models_load_then_serving(model_repository: Path, tmp_path: Path) -> None:
    """Health says NOT_SERVING (and Encode UNAVAILABLE) while loading, then SERVING; Watch sees both."""
    repository = tmp_path / "slow_repository"
    shutil.copytree(model_repository, repository)
    # A large (sparse) extra artifact makes loading slow: its sha256 is verified at start-up.
    size = 768 * 1024 * 1024
    padding = repository / "rnn" / "1" / "padding.bin"
    with padding.open("wb") as stream:
        stream.truncate(size)
    digest = hashlib.sha256()
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        digest.update(zeros)
    manifest_path = repository / "rnn" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["padding.bin"] = digest.hexdigest()
    manifest_path.write_text(json.dumps(manifest))

    port = free_port()
    log_path = tmp_path / "slow.log"
    command = [
        console_script("charrnn-server"), "--repository", str(repository), "--address", "127.0.0.1",
        "--port", str(port), "--metrics-port", "-1", "--device", "cpu",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:  # the port is bound (and the server started) before the models load
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server never listened"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.005)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            first = next(watch).status
            assert first == NOT_SERVING
            assert health_status(channel, "charrnn.v1.CharRnn") == NOT_SERVING
            stub = pb_grpc.CharRnnStub(channel)
            with pytest.raises(grpc.RpcError) as loading:
                stub.Encode(pb.EncodeRequest(model="rnn", words=["hello"]), timeout=10)
            assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
            assert loading.value.details() == "the server is still loading its models; retry shortly"
            loading_error = error_from_rpc(loading.value)
            assert loading_error.reason == "MODELS_LOADING" and loading_error.retryable
            assert loading_error.info.retry_after_s is not None and loading_error.info.retry_after_s > 0
            assert next(watch).status == SERVING
            watch.cancel()
            assert health_status(channel) == SERVING
            metadata = stub.GetModel(pb.GetModelRequest(name="rnn"), timeout=10)
            assert metadata.artifact_sha256["padding.bin"] == digest.hexdigest()
            assert len(stub.Encode(pb.EncodeRequest(model="rnn", words=["hello"]), timeout=10).results) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- graceful shutdown --------------------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests(model_repository: Path, tmp_path: Path) -> None:
    """~20 concurrent requests and a stream are in flight at SIGTERM: health turns NOT_SERVING, all of them
    complete OK, and the process exits 0."""
    # One request per run, all on one worker: 20 runs of 600 long words take over a second (a 300-word run takes
    # 17 ms on the 2-core VM of 2026-12-07, so 20 of those split over two workers could all end before SIGTERM).
    running = start_server(model_repository, tmp_path, "--max-batch-words", "600", "--workers", "1")
    try:
        with grpc.insecure_channel(running.target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.CharRnnStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == SERVING
            requests = [pb.EncodeRequest(model=LARGE_MODEL, words=long_words(600, seed)) for seed in range(20)]
            outcomes: dict[int, object] = {}
            barrier = threading.Barrier(len(requests) + 2)

            def unary(index: int) -> None:
                barrier.wait(30)
                try:
                    response = stub.Encode(requests[index], timeout=60)
                    outcomes[index] = [len(result.outputs) for result in response.results]
                except grpc.RpcError as error:
                    outcomes[index] = (error.code(), error.details())

            stream_messages = [pb.EncodeRequest(model="lstm", words=["hello", "he"]) for _ in range(30)]
            stream_outcome: list[object] = []

            def stream() -> None:
                barrier.wait(30)
                try:
                    stream_outcome.append([len(r.results) for r in stub.EncodeStream(iter(stream_messages), timeout=60)])
                except grpc.RpcError as error:
                    stream_outcome.append((error.code(), error.details()))

            threads = [threading.Thread(target=unary, args=(i,)) for i in range(len(requests))]
            threads.append(threading.Thread(target=stream))
            for thread in threads:
                thread.start()
            barrier.wait(30)
            time.sleep(0.5)  # every request has reached the server; the 20 runs take seconds
            finished_before_signal = len(outcomes)
            running.process.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING  # the drain is visible to health watchers
            watch.cancel()
            for thread in threads:
                thread.join(60)
            assert finished_before_signal < len(requests), "nothing was in flight: make the requests heavier"
            assert outcomes == {index: [64 * 64] * 600 for index in range(len(requests))}
            assert stream_outcome == [[2] * 30]
        assert running.process.wait(60) == 0, running.log()
        log = running.log()
        assert "signal received: draining for up to 10.0 s" in log
        assert log.rstrip().endswith("server.main: stopped"), log
        assert "Traceback" not in log
    finally:
        running.stop()


def test_grace_seconds_bounds_the_drain(model_repository: Path, tmp_path: Path) -> None:
    """An endless stream and queued requests at SIGTERM: the server waits about --grace-seconds, then cancels
    them and exits 0, not waiting for the queued work."""
    grace = 1.0
    running = start_server(model_repository, tmp_path, "--grace-seconds", str(grace), "--max-batch-words", "300")
    try:
        with grpc.insecure_channel(running.target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.CharRnnStub(channel)
            stop_sending = threading.Event()
            first_response = threading.Event()
            stream_result: list[object] = []

            def endless() -> Iterator[pb.EncodeRequest]:
                while not stop_sending.is_set():
                    yield pb.EncodeRequest(model="rnn", words=["hello"])
                    time.sleep(0.02)

            def stream() -> None:
                received = 0
                try:
                    for _ in stub.EncodeStream(endless(), timeout=60):
                        received += 1
                        first_response.set()
                    stream_result.append(("finished", received))
                except grpc.RpcError as error:
                    stream_result.append((error.code(), received))

            queued: list[grpc.StatusCode] = []

            def unary(seed: int) -> None:
                try:
                    stub.Encode(pb.EncodeRequest(model=LARGE_MODEL, words=long_words(300, seed)), timeout=60)
                    queued.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    queued.append(error.code())

            streamer = threading.Thread(target=stream)
            streamer.start()
            assert first_response.wait(30)
            workers = [threading.Thread(target=unary, args=(seed,)) for seed in range(120)]  # several seconds of work on 2 cores
            for worker in workers:
                worker.start()
            time.sleep(0.3)
            signalled = time.monotonic()
            running.process.send_signal(signal.SIGTERM)
            status = running.process.wait(30)
            elapsed = time.monotonic() - signalled
            stop_sending.set()
            streamer.join(30)
            for worker in workers:
                worker.join(30)
        assert status == 0, running.log()
        assert grace - 0.2 <= elapsed <= grace + 4.0, f"exited {elapsed:.2f} s after SIGTERM with --grace-seconds {grace}"
        assert len(stream_result) == 1 and stream_result[0][0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert stream_result[0][1] > 10  # it was served until the grace period ended
        assert grpc.StatusCode.OK in queued and set(queued) - {grpc.StatusCode.OK} <= {
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
        }
        assert queued.count(grpc.StatusCode.OK) < len(queued), "the grace period cancelled nothing"
        assert f"signal received: draining for up to {grace} s" in running.log()
    finally:
        running.stop()


# ---- refusing to start --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["sha256_mismatch", "missing_onnx", "empty_repository", "absent_repository"])
def test_refuses_to_start_on_a_bad_repository(model_repository: Path, tmp_path: Path, damage: str) -> None:
    repository = tmp_path / "repository"
    onnx_path = repository / "lstm" / "1" / "model.onnx"
    if damage in ("sha256_mismatch", "missing_onnx"):
        shutil.copytree(model_repository, repository)
        if damage == "sha256_mismatch":
            data = bytearray(onnx_path.read_bytes())
            data[len(data) // 2] ^= 0x01
            onnx_path.write_bytes(bytes(data))
        else:
            onnx_path.unlink()
    elif damage == "empty_repository":
        repository.mkdir()
    started = time.monotonic()
    result = run_refused(repository)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert time.monotonic() - started < 60
    expected = {
        "sha256_mismatch": f"charrnn-server: cannot start: {onnx_path}: sha256 ",
        "missing_onnx": f"charrnn-server: cannot start: {onnx_path}: artifact listed in the manifest is missing",
        "empty_repository": f"charrnn-server: cannot start: {repository}: no models",
        "absent_repository": (
            f"charrnn-server: cannot start: {repository}: model repository does not exist or is not a directory"
        ),
    }[damage]
    assert expected in result.stderr, result.stderr
    if damage == "sha256_mismatch":
        assert "does not match the manifest's" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("taken", ["grpc_port", "metrics_port"])
def test_refuses_to_start_on_a_taken_port(model_repository: Path, taken: str) -> None:
    """A port already in use is a clear one-line refusal naming it (exit 1), not a traceback."""
    with socket.socket() as occupier:
        occupier.bind(("127.0.0.1", 0))
        occupier.listen()
        port = occupier.getsockname()[1]
        command = [
            console_script("charrnn-server"), "--repository", str(model_repository), "--address", "127.0.0.1",
            "--device", "cpu", "--port", str(port) if taken == "grpc_port" else "0",
            "--metrics-port", str(port) if taken == "metrics_port" else "-1",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
    assert result.returncode == 1, result.stderr
    assert "charrnn-server: cannot start:" in result.stderr, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "never awaited" not in result.stderr, result.stderr


# ---- devices ------------------------------------------------------------------------------------------------------


def test_device_auto_reports_the_provider_it_runs_on(
    model_repository: Path, tmp_path: Path, cuda_probe: CudaProbe
) -> None:
    expected = CUDA if cuda_probe.works else CPU
    running = start_server(model_repository, tmp_path, "--device", "auto")
    try:
        with CharRnnClient(running.target) as client:
            assert {m.name: m.execution_provider for m in client.models()} == {name: expected for name in MODELS}
            assert client.encode("rnn", ["hello"])[0].outputs.shape == (5, 2)
        for name in MODELS:
            kind = "rnn" if name.startswith("rnn") else "lstm"
            assert f"{name} [{kind}, {expected}]" in running.log()
        # No red onnxruntime error where CUDA cannot run: the server checks before asking for CUDA, and
        # says in one plain line which provider runs and why.
        assert "Failed to load library" not in running.log(), running.log()
        if not cuda_probe.works:
            assert running.log().count("onnxruntime provider: CPUExecutionProvider (--device auto; CUDA is not usable here: ") == 1, running.log()
        samples = metric_samples(running)
        for name in MODELS:
            assert sample(samples, "charrnn_execution_provider", model=name, version="1", provider=expected) == 1.0
    finally:
        assert running.stop() == 0, running.log()


def test_device_cuda_refuses_to_start_without_cuda(
    model_repository: Path, tmp_path: Path, cuda_probe: CudaProbe
) -> None:
    if cuda_probe.works:  # then --device cuda must start and run on CUDA
        running = start_server(model_repository, tmp_path, "--device", "cuda")
        try:
            with CharRnnClient(running.target) as client:
                assert {m.execution_provider for m in client.models()} == {CUDA}
        finally:
            assert running.stop() == 0, running.log()
        return
    result = run_refused(model_repository, "--device", "cuda")
    assert result.returncode == 1, result.stderr
    assert "charrnn-server: cannot start:" in result.stderr
    assert "--device cuda" in result.stderr and CUDA in result.stderr
    assert "cannot run here: " in result.stderr, "names what is missing"
    assert "Failed to load library" not in result.stderr
    assert "Traceback" not in result.stderr


def test_cuda_parity(
    model_repository: Path, tmp_path: Path, cuda_probe: CudaProbe, large_checkpoint: Path
) -> None:
    """Where onnxruntime's CUDA provider really runs, --device cuda gives eager PyTorch's numbers too."""
    if not cuda_probe.works:
        pytest.skip(f"{CUDA} cannot start here: {cuda_probe.why}")
    modules = {name: seeded_model(spec).module for name, spec in BUILTIN_SPECS.items()}
    modules[LARGE_MODEL] = load_checkpoint(large_checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET).module
    alphabets = {**{name: spec.alphabet for name, spec in BUILTIN_SPECS.items()}, LARGE_MODEL: LARGE_ALPHABET}
    running = start_server(model_repository, tmp_path, "--device", "cuda")
    try:
        with CharRnnClient(running.target) as client:
            assert {m.execution_provider for m in client.models()} == {CUDA}
            rng = np.random.default_rng(0)
            for name, module in modules.items():
                alphabet = alphabets[name]
                words = ["".join(rng.choice(list(alphabet), size=n)) for n in (1, 2, 5, 17, 64, 3, 40)]
                for word, encoding in zip(words, client.encode(name, words), strict=True):
                    want = eager_word(module, [alphabet.index(c) for c in word])
                    np.testing.assert_allclose(encoding.outputs, want.outputs, rtol=0, atol=PARITY_TOLERANCE)
                    np.testing.assert_allclose(encoding.hidden, want.hidden, rtol=0, atol=PARITY_TOLERANCE)
                    if want.cell is not None:
                        np.testing.assert_allclose(encoding.cell, want.cell, rtol=0, atol=PARITY_TOLERANCE)
    finally:
        assert running.stop() == 0, running.log()


# ---- configuration from the environment ---------------------------------------------------------------------------


def test_environment_variables_configure_the_server(model_repository: Path, tmp_path: Path) -> None:
    """CHARRNN_MAX_WORDS=2 alone sets the limit; for the word length, the flag beats CHARRNN_MAX_WORD_LENGTH."""
    running = start_server(
        model_repository, tmp_path, "--max-word-length", "6",
        env={"CHARRNN_MAX_WORDS": "2", "CHARRNN_MAX_WORD_LENGTH": "3"},
    )
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.CharRnnStub(channel)
            with pytest.raises(grpc.RpcError) as too_many:
                stub.Encode(pb.EncodeRequest(model="rnn", words=["he", "ll", "o"]), timeout=10)
            assert too_many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert too_many.value.details() == "the request has 3 words, more than the limit of 2"
            ok = stub.Encode(pb.EncodeRequest(model="rnn", words=["hello", "helloo"]), timeout=10)
            assert [r.length for r in ok.results] == [5, 6]
            assert stub.GetModel(pb.GetModelRequest(name="lstm"), timeout=10).max_word_length == 6
            with pytest.raises(grpc.RpcError) as too_long:
                stub.Encode(pb.EncodeRequest(model="rnn", words=["hellooo"]), timeout=10)
            assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert too_long.value.details() == "word 0 'hellooo': the word has 7 characters, more than the limit of 6"
    finally:
        assert running.stop() == 0, running.log()


# ---- metrics --------------------------------------------------------------------------------------------------------


def test_prometheus_metrics(server: ServerProcess) -> None:
    model = "rnn_multi_layers"
    before = metric_samples(server)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.CharRnnStub(channel)
        for words in (["hello"], ["he", "lo"], ["o"] * 5):
            stub.Encode(pb.EncodeRequest(model=model, words=words), timeout=10)
        for request in (pb.EncodeRequest(model="unknown-model", words=["he"]), pb.EncodeRequest(model=model, words=["x"])):
            with pytest.raises(grpc.RpcError):
                stub.Encode(request, timeout=10)
        stream = [pb.EncodeRequest(model=model, words=["hel"]), pb.EncodeRequest(model=model, words=["lo", "x"])]
        assert len(list(stub.EncodeStream(iter(stream), timeout=10))) == 2
        stub.ListModels(pb.ListModelsRequest(), timeout=10)
    after = metric_samples(server)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "charrnn_requests_total"
    assert delta(requests, method="Encode", model=model, version="1", code="OK") == 3
    assert delta(requests, method="Encode", model=model, version="", code="INVALID_ARGUMENT") == 1
    assert delta(requests, method="Encode", model="", version="", code="NOT_FOUND") == 1  # unknown names are not labels
    assert not any(dict(labels).get("model") == "unknown-model" for _, labels in after)
    assert delta(requests, method="EncodeStream", model=model, version="1", code="OK") == 2
    assert delta(requests, method="ListModels", model="", version="", code="OK") == 1
    # Latency histograms: counts, sums and cumulative buckets ending at +Inf.
    assert delta("charrnn_request_seconds_count", method="Encode", model=model) == 4
    assert delta("charrnn_request_seconds_sum", method="Encode", model=model) > 0
    assert sample(after, "charrnn_request_seconds_bucket", method="Encode", model=model, le="+Inf") == sample(
        after, "charrnn_request_seconds_count", method="Encode", model=model
    )
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in after.items()
        if name == "charrnn_request_seconds_bucket" and dict(labels).get("model") == model
        and dict(labels).get("method") == "Encode"
    )
    assert len(buckets) > 5 and [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert delta("charrnn_queue_wait_seconds_count", model=model) == 5
    assert delta("charrnn_inference_seconds_count", model=model) >= 3
    assert delta("charrnn_inference_seconds_sum", model=model) > 0
    assert delta("charrnn_batch_words_sum", model=model) == 1 + 2 + 5 + 1 + 1  # good words only
    assert delta("charrnn_words_per_request_count", model=model) == 5
    assert delta("charrnn_words_per_request_sum", model=model) == 1 + 2 + 5 + 1 + 2
    for name in MODELS:
        assert sample(after, "charrnn_execution_provider", model=name, version="1", provider=CPU) == 1.0


# ---- the serving path does not need torch -------------------------------------------------------------------------


def test_serving_path_never_imports_torch(server: ServerProcess) -> None:
    code = (
        "import sys\n"
        "import server.main, server.grpc.charrnn_v1, server.core.engine, server.core.batcher, server.core.runtime, server.config\n"
        "import clients.client\n"
        "server.main.parse_config(['--repository', 'x'])\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # The running server has not loaded torch's libraries either.
    maps = Path(f"/proc/{server.process.pid}/maps")
    if maps.exists():
        loaded = maps.read_text()
        assert "onnxruntime" in loaded  # the check sees the server's libraries at all
        assert "libtorch" not in loaded


# ---- reload -----------------------------------------------------------------------------------------------------


def test_sighup_reloads_instead_of_killing_the_server(unit_repository: Path, tmp_path: Path) -> None:
    running = start_server(unit_repository, tmp_path)
    try:
        for count in (1, 2):
            running.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while running.log().count("reload done") < count:
                assert running.process.poll() is None, running.log()
                assert time.monotonic() < deadline, running.log()
                time.sleep(0.02)
        with grpc.insecure_channel(running.target) as channel:
            assert health_status(channel) == SERVING
            response = pb_grpc.CharRnnStub(channel).Encode(pb.EncodeRequest(model="lstm", words=["hello"]), timeout=10)
            assert len(response.results) == 1
    finally:
        assert running.stop() == 0, running.log()
