"""Shared fixtures: a model repository exported once per session, a user checkpoint, a real server subprocess."""

from __future__ import annotations

import string
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.processes import ServerProcess, spawn
from export.models import BUILTIN_SPECS, load_checkpoint, seeded_model
from export.repository import export_model

LARGE_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + "0123"  # 56 letters
LARGE_ALPHABET += "-"  # 57 letters, as in the issue
assert len(LARGE_ALPHABET) == 57 and len(set(LARGE_ALPHABET)) == 57

LARGE_MODEL = "large_lstm"


@pytest.fixture(scope="session", autouse=True)
def single_threaded_torch() -> Iterator[None]:
    """Eager runs of these tiny modules are several times faster on one thread, and servers share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def large_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state_dict of LSTM(57, 64, num_layers=2) saved the way users save theirs."""
    torch.manual_seed(1234)
    module = torch.nn.LSTM(input_size=len(LARGE_ALPHABET), hidden_size=64, num_layers=2)
    path = tmp_path_factory.mktemp("checkpoints") / "large_lstm.pt"
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory, large_checkpoint: Path) -> Path:
    """The three built-in models plus the checkpoint-imported large LSTM, exported once per session."""
    repository = tmp_path_factory.mktemp("model_repository")
    for spec in BUILTIN_SPECS.values():
        export_model(seeded_model(spec), repository)
    export_model(
        load_checkpoint(large_checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET), repository
    )
    return repository


def console_script(name: str) -> str:
    """Path of one of the project's console scripts, installed beside this interpreter."""
    path = Path(sys.executable).with_name(name)
    assert path.exists(), f"{path} not found: install the project (pip install -e '.[test]')"
    return str(path)


def start_server(
    repository: Path, tmp_path: Path, *extra_args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> ServerProcess:
    """Start charrnn-server in a subprocess and wait until its health service reports SERVING."""
    port_file = tmp_path / f"ports-{time.monotonic_ns()}.json"
    command = [
        console_script("charrnn-server"), "--repository", str(repository), "--address", "127.0.0.1",
        "--port", "0", "--metrics-port", "0", "--port-file", str(port_file), "--device", "cpu", *extra_args,
    ]
    server = spawn("charrnn-server", command, port_file, port_file.with_suffix(".log"), timeout, env)
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    assert status.status == health_pb2.HealthCheckResponse.SERVING, status
    return server


@pytest.fixture(scope="session")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One charrnn-server over the session's model repository, shared by read-only tests."""
    running = start_server(model_repository, tmp_path_factory.mktemp("server"))
    yield running
    assert running.stop() == 0, running.log()
