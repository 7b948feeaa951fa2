"""Model versions in one server, in process: the flat layout as version 1, rescans that load a new version and
swap the default, refused versions (bad sha256, broken ONNX, alphabet mismatch, half-written folder) that leave
the old one serving, removal, and requests in flight finishing on the version they started on.

Real onnxruntime sessions on tests/onnx_models.py's torch-free models, real gRPC over loopback; no torch, no
subprocess. The same behaviour across real processes and SIGHUP is tests/test_model_lifecycle.py's.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients.client import CharRnnClient, ModelNotFoundError
from export.manifest import MANIFEST_FILE, ONNX_FILE, Manifest
from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from server.core.batcher import BatchSettings
from server.core.engine import EngineSettings, Limits, VersionState, load_engine
from server.core.errors import ModelNotFoundError as CoreModelNotFoundError
from server.core.errors import Reason, VersionNotFoundError
from server.core.repository import RepositoryWatcher
from tests.helpers import InProcessServer
from tests.onnx_models import write_model

pytestmark = pytest.mark.unit

WORDS = ["hello", "h", "oleh", "hell"]


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """rnn in the flat layout (version 1 by convention) and lstm as lstm/1/."""
    repo = tmp_path / "repo"
    write_model(repo, "rnn", "rnn", "helo", seed=1)
    write_model(repo, "lstm", "lstm", "helo", 2, 3, seed=2, version=1)
    return repo


@pytest.fixture
def server(repository: Path) -> Iterator[InProcessServer]:
    running = InProcessServer(repository)
    yield running
    running.stop()


def reload(server: InProcessServer) -> bool:
    return bool(server.call(server.running.reload()))


def failures(server: InProcessServer, model: str, version: int) -> float:
    value = server.running.metrics.registry.get_sample_value(
        "charrnn_model_load_failures_total", {"model": model, "version": str(version)}
    )
    return value or 0.0


def states(client: CharRnnClient, model: str) -> list[tuple[int, str, bool]]:
    return [(v.version, v.state, v.default) for v in client.model(model).versions]


def test_the_flat_layout_is_version_1_and_responses_name_their_version(server: InProcessServer) -> None:
    with CharRnnClient(server.target) as client:
        assert {e.version for e in client.encode("rnn", WORDS)} == {1}
        assert {e.version for e in client.encode("lstm", WORDS)} == {1}
        info = client.model("rnn")
        assert info.version == 1 and states(client, "rnn") == [(1, "ready", True)]
        assert [m.version for m in client.models()] == [1, 1]


def test_a_rescan_loads_a_new_version_and_makes_it_the_default(server: InProcessServer, repository: Path) -> None:
    with CharRnnClient(server.target) as client:
        old = client.encode("rnn", WORDS)
        write_model(repository, "rnn", "rnn", "helo", seed=7, version=2)
        assert reload(server)
        new = client.encode("rnn", WORDS)
        assert {e.version for e in new} == {2}
        assert not np.allclose(old[0].outputs, new[0].outputs), "version 2 has other weights"
        assert states(client, "rnn") == [(2, "ready", True)]  # --keep-versions 1: version 1 is unloaded
        with pytest.raises(ModelNotFoundError) as raised:
            client.encode("rnn", WORDS, version=1)
        assert raised.value.reason == Reason.VERSION_NOT_FOUND and "loaded versions: 2" in raised.value.details
        assert server.running.metrics.registry.get_sample_value("charrnn_model_default_version", {"model": "rnn"}) == 2
        assert server.running.metrics.registry.get_sample_value(
            "charrnn_execution_provider", {"model": "rnn", "version": "2", "provider": "CPUExecutionProvider"}
        ) == 1
        assert client.health() == "SERVING"


def test_keep_versions_serves_the_older_version_on_request(repository: Path) -> None:
    server = InProcessServer(repository, "--keep-versions", "2")
    try:
        with CharRnnClient(server.target) as client:
            before = client.encode("rnn", WORDS)
            write_model(repository, "rnn", "rnn", "helo", seed=7, version=2)
            assert reload(server)
            assert states(client, "rnn") == [(1, "ready", False), (2, "ready", True)]
            pinned = client.encode("rnn", WORDS, version=1)
            assert {e.version for e in pinned} == {1}
            np.testing.assert_array_equal(pinned[0].outputs, before[0].outputs)
            assert client.model("rnn", version=1).version == 1
            assert {e.version for e in client.encode("rnn", WORDS)} == {2}
    finally:
        server.stop()


def corrupt_onnx(folder: Path) -> None:
    data = bytearray((folder / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / ONNX_FILE).write_bytes(bytes(data))


def broken_onnx(folder: Path) -> None:
    """Garbage ONNX whose sha256 the manifest records: only onnxruntime can tell."""
    (folder / ONNX_FILE).write_bytes(b"not an onnx model")
    manifest = Manifest.read(folder)
    from export.manifest import sha256_file

    Manifest.from_dict({**_as_dict(manifest), "artifacts": {ONNX_FILE: sha256_file(folder / ONNX_FILE)}}).write(folder)


def alphabet_mismatch(folder: Path) -> None:
    """A manifest whose alphabet (3 letters) is not the graph's input size (4)."""
    manifest = Manifest.read(folder)
    Manifest.from_dict({**_as_dict(manifest), "alphabet": "hel", "input_size": 3}).write(folder)


def half_written(folder: Path) -> None:
    (folder / MANIFEST_FILE).unlink()


def _as_dict(manifest: Manifest) -> dict[str, object]:
    import json

    return json.loads(manifest.to_json())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (corrupt_onnx, "does not match the manifest"),
        (broken_onnx, "INVALID_PROTOBUF"),
        (alphabet_mismatch, "takes 4 letters per character"),
        (half_written, "no manifest"),
    ],
    ids=["bad-sha256", "broken-onnx", "alphabet-mismatch", "half-written"],
)
def test_a_failing_version_is_refused_and_the_old_one_keeps_serving(
    server: InProcessServer, repository: Path, damage: object, message: str
) -> None:
    with CharRnnClient(server.target) as client:
        before = client.encode("rnn", WORDS)
        folder = write_model(repository, "rnn", "rnn", "helo", seed=7, version=2)
        damage(folder)  # type: ignore[operator]
        assert reload(server)  # the rescan worked; it refused one version
        after = client.encode("rnn", WORDS)
        assert {e.version for e in after} == {1}
        np.testing.assert_array_equal(after[0].outputs, before[0].outputs)
        versions = client.model("rnn").versions
        assert [(v.version, v.state, v.default) for v in versions] == [(1, "ready", True), (2, "failed", False)]
        assert message in versions[1].error
        assert failures(server, "rnn", 2) == 1
        assert client.health() == "SERVING"
        with pytest.raises(ModelNotFoundError) as raised:
            client.encode("rnn", WORDS, version=2)
        assert raised.value.reason == Reason.VERSION_NOT_FOUND and "failed to load" in raised.value.details
        # The same broken files are not retried (nor counted) on every rescan; fixed files are.
        assert reload(server)
        assert failures(server, "rnn", 2) == 1
        shutil.rmtree(folder)
        write_model(repository, "rnn", "rnn", "helo", seed=7, version=2)
        assert reload(server)
        assert {e.version for e in client.encode("rnn", WORDS)} == {2}
        assert states(client, "rnn") == [(2, "ready", True)]


def test_removing_a_model_answers_not_found_naming_the_loaded_ones(server: InProcessServer, repository: Path) -> None:
    with CharRnnClient(server.target) as client:
        shutil.rmtree(repository / "lstm")
        assert reload(server)
        with pytest.raises(ModelNotFoundError) as raised:
            client.encode("lstm", WORDS)
        assert raised.value.reason == Reason.MODEL_NOT_FOUND and "(models: rnn)" in raised.value.details
        assert [m.name for m in client.models()] == ["rnn"]
        assert client.health() == "SERVING"


def test_an_empty_or_missing_repository_changes_nothing(server: InProcessServer, repository: Path) -> None:
    moved = repository.with_name("elsewhere")
    repository.rename(moved)
    assert not reload(server)  # the hook failed and said so; the models stay
    repository.mkdir()
    assert not reload(server)
    with CharRnnClient(server.target) as client:
        assert [m.name for m in client.models()] == ["lstm", "rnn"]
        assert client.encode("rnn", WORDS)[0].version == 1


def test_in_flight_requests_finish_on_the_version_they_started_on(repository: Path) -> None:
    """Engine level, deterministic: a request holds its version across the swap; the old runner closes after it."""
    settings = EngineSettings("cpu", 1, Limits(64, 64), BatchSettings(64, 0.0, 1024), keep_versions=1)

    async def scenario() -> None:
        engine = load_engine(repository, settings)
        engine.start()
        watcher = RepositoryWatcher(repository, engine, settings)
        old_runner = engine._defaults["rnn"].runner  # noqa: SLF001 - the runner the old version answers through
        in_flight = asyncio.ensure_future(engine.encode_rows("rnn", WORDS))
        await asyncio.sleep(0)  # the request has chosen its version and is waiting for its run
        write_model(repository, "rnn", "rnn", "helo", seed=7, version=2)
        shutil.rmtree(repository / "lstm")
        await watcher.rescan()
        assert engine.models["rnn"].version == 2
        assert [s.state for s in engine.version_statuses("rnn")] in ([VersionState.READY], [VersionState.UNLOADING, VersionState.READY])
        rows = await in_flight
        assert rows.model.version == 1 and rows.outputs is not None
        assert (await engine.encode_rows("rnn", WORDS)).model.version == 2
        await engine.retired()
        assert old_runner._closed  # noqa: SLF001
        assert [(s.version, s.state) for s in engine.version_statuses("rnn")] == [(2, VersionState.READY)]
        with pytest.raises(CoreModelNotFoundError, match=r"\(models: rnn\)"):
            await engine.encode_rows("lstm", WORDS)
        with pytest.raises(VersionNotFoundError):
            await engine.encode_rows("rnn", WORDS, version=5)
        await engine.close()

    asyncio.run(scenario())


def test_the_raw_response_carries_the_version_field(server: InProcessServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.CharRnnStub(channel)
        response = stub.Encode(pb.EncodeRequest(model="rnn", words=WORDS), timeout=10)
        assert response.version == 1
        metadata = stub.GetModel(pb.GetModelRequest(name="rnn"), timeout=10)
        assert metadata.version == 1
        assert [(v.version, v.state, v.is_default) for v in metadata.versions] == [(1, pb.VERSION_STATE_READY, True)]
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetModel(pb.GetModelRequest(name="rnn", version=9), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
