"""The charrnn-export command run as users run it: a subprocess of `python -m export` or the installed console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from export.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    Manifest,
    list_model_folders,
    sha256_file,
    version_folders,
)
from export.trace import PARITY_TOLERANCE
from tests.helpers import LARGE_ALPHABET, LARGE_MODEL

pytestmark = pytest.mark.export

BUILTINS = ("rnn", "rnn_multi_layers", "lstm")
SCRIPT = Path(sys.executable).parent / "charrnn-export"
LAUNCHERS = {
    "python-m-export": [sys.executable, "-m", "export"],
    "charrnn-export": [str(SCRIPT)],
}
WARNING_SETTINGS = {
    "plain": None,  # as most users run it
    "warnings-shown": "default",  # PYTHONWARNINGS=default: DeprecationWarnings are no longer hidden by Python
}


def _environment(python_warnings: str | None = None, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONWARNINGS", "CHARRNN_REPOSITORY", "CHARRNN_LOG_LEVEL"}
    }
    if python_warnings is not None:
        env["PYTHONWARNINGS"] = python_warnings
    env.update(extra)
    return env


def _run(
    arguments: list[str],
    cwd: Path,
    launcher: str = "python-m-export",
    python_warnings: str | None = None,
    **extra_env: str,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAUNCHERS[launcher], *arguments],
        cwd=cwd,
        env=_environment(python_warnings, **extra_env),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _assert_no_deprecation_noise(stderr: str) -> None:
    lowered = stderr.lower()
    assert "deprecat" not in lowered, f"deprecation text reached the terminal:\n{stderr}"
    assert "warning" not in lowered, f"a warning reached the terminal:\n{stderr}"
    assert "traceback" not in lowered, stderr


def _assert_valid_model(folder: Path) -> Manifest:
    manifest = Manifest.read(folder)
    manifest.verify_artifacts(folder)
    assert {entry.name for entry in folder.iterdir()} == {MANIFEST_FILE, ONNX_FILE, TORCHSCRIPT_FILE}
    assert max(manifest.parity["onnx_max_abs_error"], manifest.parity["torchscript_max_abs_error"]) <= PARITY_TOLERANCE
    return manifest


def _entries(folder: Path) -> list[str]:
    """Every entry, hidden ones included (staging and retired folders start with a dot)."""
    return sorted(entry.name for entry in folder.iterdir()) if folder.exists() else []


def test_console_script_is_installed() -> None:
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not an installed executable"


@pytest.mark.parametrize("warnings_setting", WARNING_SETTINGS)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_exports_all_builtins(tmp_path: Path, model_repository: Path, launcher: str, warnings_setting: str) -> None:
    out = tmp_path / "repo"
    result = _run(["--out", str(out)], tmp_path, launcher, WARNING_SETTINGS[warnings_setting])
    assert result.returncode == 0, result.stderr
    _assert_no_deprecation_noise(result.stderr)
    assert result.stdout.splitlines() == [f"{name} version 1: {out / name / '1'}" for name in BUILTINS]
    assert _entries(out) == sorted(BUILTINS)
    assert [folder.name for folder in list_model_folders(out)] == sorted(BUILTINS)
    for name in BUILTINS:
        assert _entries(out / name) == ["1"]
        manifest = _assert_valid_model(out / name / "1")
        assert manifest.name == name
        assert manifest.weights == {"source": "seed", "seed": 0}
        # A separate process produces the same ONNX bytes as the in-process export of the test session.
        assert (out / name / "1" / ONNX_FILE).read_bytes() == (model_repository / name / "1" / ONNX_FILE).read_bytes()
    assert not (tmp_path / "model_repository").exists(), "--out was not honoured"


def test_repository_from_environment(tmp_path: Path) -> None:
    out = tmp_path / "from_env"
    result = _run(["--only", "rnn"], tmp_path, CHARRNN_REPOSITORY=str(out))
    assert result.returncode == 0, result.stderr
    assert _entries(out) == ["rnn"]
    _assert_valid_model(out / "rnn" / "1")
    assert not (tmp_path / "model_repository").exists()


def test_checkpoint_export(tmp_path: Path, large_checkpoint: Path) -> None:
    out = tmp_path / "repo"
    result = _run(
        [
            "--out", str(out),
            "--checkpoint", str(large_checkpoint),
            "--name", LARGE_MODEL,
            "--kind", "lstm",
            "--alphabet", LARGE_ALPHABET,
        ],
        tmp_path,
        "charrnn-export",
    )
    assert result.returncode == 0, result.stderr
    _assert_no_deprecation_noise(result.stderr)
    assert result.stdout.splitlines() == [f"{LARGE_MODEL} version 1: {out / LARGE_MODEL / '1'}"]
    assert _entries(out) == [LARGE_MODEL]
    manifest = _assert_valid_model(out / LARGE_MODEL / "1")
    assert (manifest.kind, manifest.alphabet, manifest.input_size) == ("lstm", LARGE_ALPHABET, 57)
    assert (manifest.hidden_size, manifest.num_layers) == (64, 2)
    assert manifest.weights == {
        "source": "checkpoint",
        "path": str(large_checkpoint),
        "sha256": sha256_file(large_checkpoint),
    }

    # The exported graph computes the user's LSTM.
    module = torch.nn.LSTM(57, 64, num_layers=2, batch_first=True)
    module.load_state_dict(torch.load(large_checkpoint, weights_only=True))
    word = [LARGE_ALPHABET.index(letter) for letter in "Hello-World0"]
    x = np.zeros((1, len(word), 57), dtype=np.float32)
    x[0, np.arange(len(word)), word] = 1.0
    zeros = np.zeros((2, 1, 64), dtype=np.float32)
    session = onnxruntime.InferenceSession(str(out / LARGE_MODEL / "1" / ONNX_FILE), providers=["CPUExecutionProvider"])
    outputs, h_n, c_n = session.run(
        None, {"x": x, "lengths": np.array([len(word)], dtype=np.int32), "h0": zeros, "c0": zeros}
    )
    with torch.no_grad():
        want_outputs, (want_h, want_c) = module(torch.from_numpy(x))
    assert float(np.max(np.abs(outputs - want_outputs.numpy()))) <= PARITY_TOLERANCE
    assert float(np.max(np.abs(h_n - want_h.numpy()))) <= PARITY_TOLERANCE
    assert float(np.max(np.abs(c_n - want_c.numpy()))) <= PARITY_TOLERANCE


def test_mismatched_alphabet_exits_2(tmp_path: Path, large_checkpoint: Path) -> None:
    out = tmp_path / "repo"
    result = _run(
        ["--out", str(out), "--checkpoint", str(large_checkpoint), "--name", "mine", "--kind", "lstm",
         "--alphabet", "helo"],
        tmp_path,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "charrnn-export: error:" in result.stderr
    assert "the alphabet has 4 letters but the checkpoint's input size is 57" in result.stderr
    assert "traceback" not in result.stderr.lower()
    assert result.stdout == ""
    assert _entries(out) == [], "a failed export left files in the repository"
    assert not (out / "mine").exists()


def test_wrong_kind_exits_2(tmp_path: Path, large_checkpoint: Path) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    result = _run(
        ["--out", str(out), "--checkpoint", str(large_checkpoint), "--name", "mine", "--kind", "gru",
         "--alphabet", LARGE_ALPHABET],
        tmp_path,
    )
    assert result.returncode == 2
    assert "the checkpoint is a lstm" in result.stderr and "--kind gru was declared" in result.stderr
    assert _entries(out) == []


def test_unsafe_checkpoint_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(torch.nn.LSTM(4, 2), path)
    out = tmp_path / "repo"
    result = _run(
        ["--out", str(out), "--checkpoint", str(path), "--name", "mine", "--kind", "lstm", "--alphabet", "helo"],
        tmp_path,
    )
    assert result.returncode == 2
    assert "cannot be loaded as a weights-only state_dict" in result.stderr
    assert _entries(out) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param(
            ["--checkpoint", "{checkpoint}", "--name", "mine", "--alphabet", "helo"],
            "--checkpoint needs --kind",
            id="checkpoint-without-kind",
        ),
        pytest.param(
            ["--checkpoint", "{checkpoint}", "--kind", "lstm"],
            "--checkpoint needs --name, --alphabet",
            id="checkpoint-without-name-and-alphabet",
        ),
        pytest.param(["--name", "mine"], "go with --checkpoint", id="name-without-checkpoint"),
        pytest.param(
            ["--checkpoint", "{checkpoint}", "--name", "m", "--kind", "lstm", "--alphabet", "helo", "--only", "rnn"],
            "--only selects built-in models",
            id="only-with-checkpoint",
        ),
        pytest.param(["--only", "nope"], "unknown built-in model(s) nope", id="unknown-builtin"),
        pytest.param(
            ["--checkpoint", "{checkpoint}", "--name", "m", "--kind", "transformer", "--alphabet", "helo"],
            "invalid choice: 'transformer'",
            id="unknown-kind",
        ),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, large_checkpoint: Path, arguments: list[str], message: str) -> None:
    out = tmp_path / "repo"
    filled = [argument.replace("{checkpoint}", str(large_checkpoint)) for argument in arguments]
    result = _run(["--out", str(out), *filled], tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("usage: charrnn-export"), result.stderr
    assert message in result.stderr
    assert "traceback" not in result.stderr.lower()
    assert _entries(out) == []


def test_help_does_not_import_torch(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from export.__main__ import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=_environment(), capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--checkpoint" in result.stdout
    assert result.stdout.rstrip().endswith("torch not loaded")


def test_reexport_writes_the_next_version_and_never_touches_the_others(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    first = _run(["--out", str(out), "--only", "lstm", "--seed", "0"], tmp_path)
    assert first.returncode == 0, first.stderr
    old_manifest = _assert_valid_model(out / "lstm" / "1")
    version_one = {entry.name: entry.read_bytes() for entry in (out / "lstm" / "1").iterdir()}

    second = _run(["--out", str(out), "--only", "lstm", "--seed", "1"], tmp_path, "charrnn-export")
    assert second.returncode == 0, second.stderr
    _assert_no_deprecation_noise(second.stderr)
    assert second.stdout.splitlines() == [f"lstm version 2: {out / 'lstm' / '2'}"]
    # A new folder beside the old one; no staging folder is left behind; version 1 is byte for byte as it was.
    assert _entries(out) == ["lstm"] and _entries(out / "lstm") == ["1", "2"]
    assert {entry.name: entry.read_bytes() for entry in (out / "lstm" / "1").iterdir()} == version_one
    new_manifest = _assert_valid_model(out / "lstm" / "2")
    assert new_manifest.weights == {"source": "seed", "seed": 1}
    assert old_manifest.weights == {"source": "seed", "seed": 0}
    assert new_manifest.artifacts[ONNX_FILE] != old_manifest.artifacts[ONNX_FILE]

    # --version N replaces that version whole (not merged).
    (out / "lstm" / "2" / "stray.txt").write_text("left by an operator\n")
    third = _run(["--out", str(out), "--only", "lstm", "--seed", "2", "--version", "2"], tmp_path)
    assert third.returncode == 0, third.stderr
    assert _entries(out / "lstm") == ["1", "2"]
    assert _assert_valid_model(out / "lstm" / "2").weights == {"source": "seed", "seed": 2}

    # A failed export (wrong alphabet) of the same name leaves every version exactly as it was, and no folder.
    checkpoint = tmp_path / "other.pt"
    torch.save(torch.nn.LSTM(5, 2, num_layers=3).state_dict(), checkpoint)
    before = {entry.relative_to(out): entry.read_bytes() for entry in out.rglob("*") if entry.is_file()}
    fourth = _run(
        ["--out", str(out), "--checkpoint", str(checkpoint), "--name", "lstm", "--kind", "lstm", "--alphabet", "helo"],
        tmp_path,
    )
    assert fourth.returncode == 2
    assert "the alphabet has 4 letters but the checkpoint's input size is 5" in fourth.stderr
    assert _entries(out / "lstm") == ["1", "2"]
    assert {entry.relative_to(out): entry.read_bytes() for entry in out.rglob("*") if entry.is_file()} == before


def test_a_flat_layout_model_is_version_1_and_the_export_adds_version_2(tmp_path: Path) -> None:
    """The layout of earlier releases (<name>/manifest.json) needs no migration: it is read as version 1."""
    out = tmp_path / "repo"
    assert _run(["--out", str(out), "--only", "rnn"], tmp_path).returncode == 0
    for entry in (out / "rnn" / "1").iterdir():  # make it the flat layout
        entry.rename(out / "rnn" / entry.name)
    (out / "rnn" / "1").rmdir()
    assert [(v.version, v.path) for v in version_folders(out / "rnn")] == [(1, out / "rnn")]
    result = _run(["--out", str(out), "--only", "rnn", "--seed", "3"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"rnn version 2: {out / 'rnn' / '2'}"]
    assert [(v.version, v.path) for v in version_folders(out / "rnn")] == [(1, out / "rnn"), (2, out / "rnn" / "2")]
    assert _assert_valid_model(out / "rnn" / "2").weights == {"source": "seed", "seed": 3}


def test_version_must_be_positive(tmp_path: Path) -> None:
    result = _run(["--out", str(tmp_path / "repo"), "--only", "rnn", "--version", "0"], tmp_path)
    assert result.returncode == 2 and "--version must be at least 1" in result.stderr
