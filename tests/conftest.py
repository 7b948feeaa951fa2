"""Shared fixtures: a model repository exported once per session, a user checkpoint, a real server subprocess.

torch is imported inside the fixtures that need it, never at module level, so `pytest -m unit` runs without
it. Plain helpers live in tests/helpers.py.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

from clients.processes import ServerProcess
from tests.helpers import LARGE_ALPHABET, LARGE_MODEL, start_server, write_pair
from tests.onnx_models import write_unit_repository

MARKERS = ("unit", "e2e", "export", "deploy")


def module_marker(path: Path) -> str | None:
    """The marker a test module declares for all its tests (`pytestmark = pytest.mark.NAME`), read from its
    source without importing it."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(target, ast.Name) and target.id == "pytestmark" for target in node.targets)
            and isinstance(node.value, ast.Attribute)
        ):
            return node.value.attr
    return None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With -m, do not even import a module whose marker the expression rules out: `pytest -m unit` must not
    import the torch-heavy modules only to deselect their tests."""
    expression = config.getoption("markexpr")
    if not expression or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    marker = module_marker(collection_path)
    if marker is None:
        return None
    return not Expression.compile(expression).evaluate(lambda name, **_: name == marker)


def selects_only_unit(expression: str) -> bool:
    """Whether a -m expression selects the unit tests and no test of any other marker."""
    compiled = Expression.compile(expression)
    return compiled.evaluate(lambda name, **_: name == "unit") and not any(
        compiled.evaluate(lambda name, other=other, **_: name == other) for other in MARKERS if other != "unit"
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The unit subset is torch-free by contract: fail a unit-only run if anything in it imported torch."""
    expression = session.config.getoption("markexpr")
    if expression and selects_only_unit(expression) and "torch" in sys.modules:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nerror: torch was imported during a unit-only run (-m {expression!r}); the unit subset must not need it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test carries one of MARKERS, so `-m unit` and friends select everything exactly once."""
    unmarked = [item.nodeid for item in items if not any(item.get_closest_marker(name) for name in MARKERS)]
    if unmarked:
        raise pytest.UsageError(
            f"tests without a marker ({', '.join(MARKERS)}): " + ", ".join(unmarked[:10])
            + (f" and {len(unmarked) - 10} more" if len(unmarked) > 10 else "")
        )


@pytest.fixture(scope="session", autouse=True)
def single_threaded_torch() -> Iterator[None]:
    """Eager runs of these tiny modules are several times faster on one thread, and servers share the two cores.

    Only where torch is already imported (by a test module that needs it): the unit subset never loads it.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def unit_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models built with onnx.helper (tests/onnx_models.py): real onnxruntime sessions, no torch."""
    return write_unit_repository(tmp_path_factory.mktemp("unit_repository"))


@pytest.fixture(scope="session")
def large_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state_dict of LSTM(57, 64, num_layers=2) saved the way users save theirs."""
    import torch

    torch.manual_seed(1234)
    module = torch.nn.LSTM(input_size=len(LARGE_ALPHABET), hidden_size=64, num_layers=2)
    path = tmp_path_factory.mktemp("checkpoints") / "large_lstm.pt"
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory, large_checkpoint: Path) -> Path:
    """The three built-in models plus the checkpoint-imported large LSTM, exported once per session."""
    from export.models import BUILTIN_SPECS, load_checkpoint, seeded_model
    from export.repository import export_model

    repository = tmp_path_factory.mktemp("model_repository")
    for spec in BUILTIN_SPECS.values():
        export_model(seeded_model(spec), repository)
    export_model(
        load_checkpoint(large_checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET), repository
    )
    return repository


@pytest.fixture(scope="session")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One charrnn-server over the session's model repository, shared by read-only tests."""
    running = start_server(model_repository, tmp_path_factory.mktemp("server"))
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, the server's certificate for 127.0.0.1, a client certificate, and an unrelated CA."""
    folder = tmp_path_factory.mktemp("pki")
    import trustme

    ca, other = trustme.CA(), trustme.CA()
    (folder / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (folder / "other-ca.pem").write_bytes(other.cert_pem.bytes())
    server_cert, server_key = write_pair(folder, ca.issue_cert("127.0.0.1", "localhost"), "server")
    client_cert, client_key = write_pair(folder, ca.issue_cert("client-a"), "client")
    misnamed_cert, misnamed_key = write_pair(folder, ca.issue_cert("elsewhere.example"), "misnamed")
    return {
        "ca": folder / "ca.pem", "other_ca": folder / "other-ca.pem", "server_cert": server_cert,
        "server_key": server_key, "client_cert": client_cert, "client_key": client_key,
        "misnamed_cert": misnamed_cert, "misnamed_key": misnamed_key,
    }
