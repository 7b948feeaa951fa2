"""Importing users' checkpoints: unsafe, corrupt or mismatched files are refused cleanly; GRU and ReLU RNNs export."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from export.manifest import MANIFEST_FILE, ONNX_FILE, TORCHSCRIPT_FILE, Manifest, sha256_file
from export.models import CheckpointError, load_checkpoint
from export.repository import export_model
from export.trace import PARITY_TOLERANCE, expected_torch_notices

pytestmark = pytest.mark.export

FloatArray = npt.NDArray[np.float32]


class _Exploit:
    """Unpickling this object runs open(marker, 'w'), i.e. creates the marker file: arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (self.marker, "w"))


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _attempt(checkpoint: Path, repository: Path, **declared: Any) -> CheckpointError:
    """Load and export as the CLI does; return the CheckpointError raised (fails if none is)."""
    arguments: dict[str, Any] = {"name": "user_model", "kind": "lstm", "alphabet": "helo", **declared}
    with pytest.raises(CheckpointError) as caught:
        export_model(load_checkpoint(checkpoint, **arguments), repository)
    return caught.value


def _assert_untouched(repository: Path, expected: set[str] | None = None) -> None:
    """The repository holds exactly the expected entries: no model folder, no hidden staging or retired folder."""
    entries = {entry.name for entry in repository.iterdir()} if repository.exists() else set()
    assert entries == (expected or set()), f"leftovers in the repository: {sorted(entries)}"


@pytest.fixture()
def repository(tmp_path: Path) -> Path:
    folder = tmp_path / "repository"
    folder.mkdir()
    return folder


# ---- files that are not a state_dict --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not a torch checkpoint\n", id="text"),
        pytest.param(bytes(range(256)) * 8, id="binary-noise"),
    ],
)
def test_corrupt_file_is_refused(tmp_path: Path, repository: Path, content: bytes) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    failure = _attempt(path, repository)
    assert str(path) in str(failure)
    assert "cannot be loaded as a weights-only state_dict" in str(failure)
    _assert_untouched(repository)


def test_truncated_checkpoint_is_refused(tmp_path: Path, repository: Path) -> None:
    whole = _save(nn.LSTM(4, 3).state_dict(), tmp_path / "whole.pt")
    path = tmp_path / "truncated.pt"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    failure = _attempt(path, repository)
    assert "cannot be loaded as a weights-only state_dict" in str(failure)
    _assert_untouched(repository)


def test_missing_file_is_refused(tmp_path: Path, repository: Path) -> None:
    failure = _attempt(tmp_path / "nowhere.pt", repository)
    assert "checkpoint file not found" in str(failure)
    _assert_untouched(repository)


def test_pickled_module_is_refused(tmp_path: Path, repository: Path) -> None:
    path = _save(nn.LSTM(4, 3), tmp_path / "module.pt")
    failure = _attempt(path, repository)
    assert "weights-only" in str(failure)
    _assert_untouched(repository)


@pytest.mark.parametrize("wrap", [pytest.param(False, id="bare-object"), pytest.param(True, id="inside-state-dict")])
def test_pickled_code_is_never_executed(tmp_path: Path, repository: Path, wrap: bool) -> None:
    marker = tmp_path / "pwned"
    payload: object = _Exploit(marker)
    if wrap:
        payload = {**nn.LSTM(4, 3).state_dict(), "weight_ih_l0": _Exploit(marker)}
    path = _save(payload, tmp_path / "evil.pt")

    failure = _attempt(path, repository)
    assert "weights-only" in str(failure)
    assert not marker.exists(), "loading the checkpoint executed code from the pickle"
    _assert_untouched(repository)

    # Control: the same kind of payload does run under an unsafe load, so the check above can fail.
    control_marker = tmp_path / "control"
    control = _save(_Exploit(control_marker), tmp_path / "control.pt")
    torch.load(control, weights_only=False).close()
    assert control_marker.exists()


def test_plain_pickle_file_is_refused(tmp_path: Path, repository: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    failure = _attempt(path, repository)
    assert "weights-only" in str(failure)
    assert not marker.exists()
    _assert_untouched(repository)


@pytest.mark.parametrize(
    ("payload", "type_name"),
    [
        pytest.param(torch.zeros(3, 4), "Tensor", id="tensor"),
        pytest.param([torch.zeros(3)], "list", id="list"),
        pytest.param(42, "int", id="int"),
    ],
)
def test_non_dict_checkpoint_is_refused(tmp_path: Path, repository: Path, payload: object, type_name: str) -> None:
    path = _save(payload, tmp_path / "other.pt")
    failure = _attempt(path, repository)
    assert f"expected a state_dict (a dict of tensors), got {type_name}" in str(failure)
    _assert_untouched(repository)


def test_linear_state_dict_is_refused(tmp_path: Path, repository: Path) -> None:
    path = _save(nn.Linear(4, 3).state_dict(), tmp_path / "linear.pt")
    failure = _attempt(path, repository)
    assert "unexpected key 'weight'" in str(failure)
    assert "torch.nn.RNN/LSTM/GRU" in str(failure)
    _assert_untouched(repository)


def test_prefixed_state_dict_is_refused(tmp_path: Path, repository: Path) -> None:
    """A whole model's state_dict (keys like rnn.weight_ih_l0) is not the recurrent module's own state_dict."""
    wrapper = nn.Sequential(nn.LSTM(4, 3))
    path = _save(wrapper.state_dict(), tmp_path / "wrapped.pt")
    failure = _attempt(path, repository)
    assert "unexpected key '0.weight_ih_l0'" in str(failure)
    _assert_untouched(repository)


def test_non_tensor_value_is_refused(tmp_path: Path, repository: Path) -> None:
    state = dict(nn.LSTM(4, 3).state_dict())
    state["bias_hh_l0"] = 3  # type: ignore[assignment]
    path = _save(state, tmp_path / "odd.pt")
    failure = _attempt(path, repository)
    assert "bias_hh_l0 is not a tensor" in str(failure)
    _assert_untouched(repository)


def test_gap_in_layers_is_refused(tmp_path: Path, repository: Path) -> None:
    state = {key: value for key, value in nn.LSTM(4, 3, num_layers=3).state_dict().items() if not key.endswith("_l1")}
    path = _save(state, tmp_path / "gap.pt")
    failure = _attempt(path, repository)
    assert "layer indices are not contiguous from 0: [0, 2]" in str(failure)
    _assert_untouched(repository)


def test_wrong_shaped_weight_is_refused(tmp_path: Path, repository: Path) -> None:
    state = dict(nn.LSTM(4, 3).state_dict())
    state["bias_ih_l0"] = torch.zeros(5)
    path = _save(state, tmp_path / "shape.pt")
    failure = _attempt(path, repository)
    assert "weights do not fit a lstm of that shape" in str(failure)
    assert "bias_ih_l0" in str(failure)
    _assert_untouched(repository)


# ---- declared kind, alphabet and name -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "declared", "found"),
    [
        pytest.param(nn.LSTM(4, 3, num_layers=2), "rnn", "lstm", id="lstm-as-rnn"),
        pytest.param(nn.RNN(4, 3), "lstm", "rnn", id="rnn-as-lstm"),
        pytest.param(nn.GRU(4, 3), "lstm", "gru", id="gru-as-lstm"),
        pytest.param(nn.GRU(4, 3), "rnn", "gru", id="gru-as-rnn"),
        pytest.param(nn.LSTM(4, 3), "gru", "lstm", id="lstm-as-gru"),
        pytest.param(nn.RNN(4, 1), "gru", "rnn", id="hidden-1-rnn-as-gru"),
    ],
)
def test_wrong_kind_is_refused(
    tmp_path: Path, repository: Path, module: nn.RNNBase, declared: str, found: str
) -> None:
    path = _save(module.state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository, kind=declared)
    assert f"the checkpoint is a {found}" in str(failure)
    assert f"--kind {declared} was declared" in str(failure)
    _assert_untouched(repository)


def test_unknown_kind_is_refused(tmp_path: Path, repository: Path) -> None:
    path = _save(nn.LSTM(4, 3).state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository, kind="transformer")
    assert "unknown kind 'transformer'" in str(failure)
    _assert_untouched(repository)


@pytest.mark.parametrize("alphabet", ["hel", "helox", "abcdefghijklmnopqrstuvwxyz"])
def test_alphabet_size_must_equal_input_size(tmp_path: Path, repository: Path, alphabet: str) -> None:
    path = _save(nn.LSTM(4, 3).state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository, alphabet=alphabet)
    assert f"the alphabet has {len(alphabet)} letters but the checkpoint's input size is 4" in str(failure)
    _assert_untouched(repository)


def test_empty_alphabet_is_refused(tmp_path: Path, repository: Path) -> None:
    path = _save(nn.LSTM(4, 3).state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository, alphabet="")
    assert "the alphabet is empty" in str(failure)
    _assert_untouched(repository)


def test_repeated_letters_are_refused(tmp_path: Path, repository: Path) -> None:
    path = _save(nn.LSTM(4, 3).state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository, alphabet="hell")
    assert "repeats the letter 'l' (positions 2 and 3)" in str(failure)
    _assert_untouched(repository)


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(nn.LSTM(4, 3, bidirectional=True), id="bidirectional-lstm"),
        pytest.param(nn.GRU(4, 3, num_layers=2, bidirectional=True), id="bidirectional-gru"),
    ],
)
def test_bidirectional_is_refused(tmp_path: Path, repository: Path, module: nn.RNNBase) -> None:
    kind = "lstm" if isinstance(module, nn.LSTM) else "gru"
    path = _save(module.state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository, kind=kind)
    assert "bidirectional" in str(failure)
    assert "weight_ih_l0_reverse" in str(failure)
    _assert_untouched(repository)


def test_projected_lstm_is_refused(tmp_path: Path, repository: Path) -> None:
    path = _save(nn.LSTM(4, 3, proj_size=2).state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository)
    assert "projected (proj_size)" in str(failure)
    assert "weight_hr_l0" in str(failure)
    _assert_untouched(repository)


def test_invalid_nonlinearity_is_refused(tmp_path: Path, repository: Path) -> None:
    path = _save(nn.RNN(4, 3).state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository, kind="rnn", nonlinearity="sigmoid")
    assert "nonlinearity must be tanh or relu, not 'sigmoid'" in str(failure)
    _assert_untouched(repository)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("../escape", id="parent"),
        pytest.param("a/b", id="slash"),
        pytest.param(".hidden", id="hidden"),
        pytest.param("-flag", id="leading-dash"),
        pytest.param("has space", id="space"),
        pytest.param("x" * 65, id="too-long"),
        pytest.param("naïve", id="non-ascii"),
        pytest.param("model\n", id="trailing-newline"),
    ],
)
def test_invalid_model_name_is_refused(tmp_path: Path, repository: Path, name: str) -> None:
    path = _save(nn.LSTM(4, 3).state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository, name=name)
    assert f"model name {name!r} is not allowed" in str(failure)
    _assert_untouched(repository)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["model.pt", "repository"]


def test_refused_checkpoint_leaves_existing_model_intact(tmp_path: Path, repository: Path) -> None:
    good = _save(nn.LSTM(4, 3).state_dict(), tmp_path / "good.pt")
    export_model(load_checkpoint(good, name="user_model", kind="lstm", alphabet="helo"), repository)
    before = {entry.name: entry.read_bytes() for entry in (repository / "user_model" / "1").iterdir()}

    bad = _save(nn.GRU(4, 3).state_dict(), tmp_path / "bad.pt")
    failure = _attempt(bad, repository, kind="lstm")
    assert "the checkpoint is a gru" in str(failure)

    _assert_untouched(repository, {"user_model"})
    after = {entry.name: entry.read_bytes() for entry in (repository / "user_model" / "1").iterdir()}
    assert after == before
    Manifest.read(repository / "user_model" / "1").verify_artifacts(repository / "user_model" / "1")


# ---- checkpoints that do export -------------------------------------------------------------------------------


def _run_onnx(
    session: onnxruntime.InferenceSession,
    words: list[list[int]],
    size: int,
    layers: int,
    hidden: int,
    h0: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """model.onnx of an RNN/GRU on a padded batch; returns (outputs, h_n)."""
    lengths = np.array([len(word) for word in words], dtype=np.int32)
    x = np.zeros((len(words), int(lengths.max()), size), dtype=np.float32)
    for row, word in enumerate(words):
        x[row, np.arange(len(word)), word] = 1.0
    if h0 is None:
        h0 = np.zeros((layers, len(words), hidden), dtype=np.float32)
    outputs, h_n = session.run(None, {"x": x, "lengths": lengths, "h0": h0})
    return outputs, h_n


def _eager(module: nn.RNNBase, word: list[int], h0: FloatArray | None = None) -> tuple[FloatArray, FloatArray]:
    x = torch.zeros(1, len(word), module.input_size)
    x[0, torch.arange(len(word)), torch.tensor(word)] = 1.0
    state = None if h0 is None else torch.from_numpy(np.ascontiguousarray(h0)).unsqueeze(1)
    with torch.no_grad():
        outputs, h_n = module(x, state)
    return outputs[0].numpy(), h_n[:, 0].numpy()


def _within_tolerance(want: FloatArray, got: FloatArray) -> bool:
    return want.shape == got.shape and bool(np.all(np.abs(want - got) <= PARITY_TOLERANCE))


@pytest.mark.parametrize(
    ("kind", "nonlinearity", "factory"),
    [
        pytest.param("gru", None, lambda: nn.GRU(7, 5, num_layers=2, batch_first=True), id="gru-2-layers"),
        pytest.param("gru", None, lambda: nn.GRU(7, 6, bias=False, batch_first=True), id="gru-no-bias"),
        pytest.param(
            "rnn", "relu", lambda: nn.RNN(7, 5, num_layers=2, nonlinearity="relu", batch_first=True), id="rnn-relu"
        ),
    ],
)
def test_gru_and_relu_checkpoints_export_with_parity(
    tmp_path: Path, repository: Path, kind: str, nonlinearity: str | None, factory: Callable[[], nn.RNNBase]
) -> None:
    alphabet = "abcdefg"
    torch.manual_seed(3)
    original = factory().eval()
    path = _save(original.state_dict(), tmp_path / f"{kind}.pt")

    manifest = export_model(
        load_checkpoint(path, name="user_model", kind=kind, alphabet=alphabet, nonlinearity=nonlinearity), repository
    )
    folder = repository / "user_model" / "1"
    _assert_untouched(repository, {"user_model"})
    assert {entry.name for entry in folder.iterdir()} == {MANIFEST_FILE, ONNX_FILE, TORCHSCRIPT_FILE}
    assert Manifest.read(folder) == manifest
    manifest.verify_artifacts(folder)
    assert manifest.kind == kind
    assert manifest.nonlinearity == nonlinearity
    assert manifest.bias == original.bias
    assert (manifest.input_size, manifest.hidden_size, manifest.num_layers) == (
        7, original.hidden_size, original.num_layers,
    )
    assert manifest.weights == {"source": "checkpoint", "path": str(path), "sha256": sha256_file(path)}
    assert max(manifest.parity["onnx_max_abs_error"], manifest.parity["torchscript_max_abs_error"]) <= PARITY_TOLERANCE
    assert not manifest.has_cell_state
    assert [spec.name for spec in manifest.onnx_inputs] == ["x", "lengths", "h0"]

    graph = onnx.load(str(folder / ONNX_FILE)).graph
    recurrent = [node for node in graph.node if node.op_type in ("RNN", "LSTM", "GRU")]
    assert [node.op_type for node in recurrent] == [kind.upper()] * original.num_layers
    if nonlinearity == "relu":
        for node in recurrent:
            activations = [attr for attr in node.attribute if attr.name == "activations"]
            assert activations and [a.decode() for a in activations[0].strings] == ["Relu"]

    # Parity against the ORIGINAL module the user saved (not the reloaded one), mixed lengths.
    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    words = [rng.integers(0, 7, size=length).tolist() for length in (1, 2, 5, 17, 64, 9, 1)]
    outputs, h_n = _run_onnx(session, words, 7, original.num_layers, original.hidden_size)
    with expected_torch_notices():
        scripted = torch.jit.load(str(folder / TORCHSCRIPT_FILE))
    lengths = torch.tensor([len(word) for word in words])
    x = torch.zeros(len(words), 64, 7)
    for row, word in enumerate(words):
        x[row, torch.arange(len(word)), torch.tensor(word)] = 1.0
    h0 = torch.zeros(original.num_layers, len(words), original.hidden_size)
    with torch.no_grad():
        ts_outputs, ts_h_n = (tensor.numpy() for tensor in scripted(x, lengths, h0))
    for row, word in enumerate(words):
        want_outputs, want_h = _eager(original, word)
        assert _within_tolerance(want_outputs, outputs[row, : len(word)]), f"onnx outputs of word {row}"
        assert _within_tolerance(want_h, h_n[:, row]), f"onnx h_n of word {row}"
        assert np.all(outputs[row, len(word) :] == 0.0)
        assert _within_tolerance(want_outputs, ts_outputs[row, : len(word)]), f"torchscript outputs of word {row}"
        assert _within_tolerance(want_h, ts_h_n[:, row]), f"torchscript h_n of word {row}"

    # Continuation from a returned state.
    word = [1, 4, 2, 2, 6, 0, 3]
    _, h_head = _run_onnx(session, [word[:3]], 7, original.num_layers, original.hidden_size)
    tail_outputs, h_tail = _run_onnx(session, [word[3:]], 7, original.num_layers, original.hidden_size, h0=h_head)
    want_outputs, want_h = _eager(original, word)
    assert _within_tolerance(want_outputs[3:], tail_outputs[0])
    assert _within_tolerance(want_h, h_tail[:, 0])


def test_relu_checkpoint_declared_relu_differs_from_tanh(tmp_path: Path, repository: Path) -> None:
    """--nonlinearity really reaches the exported graph: the same weights as tanh give other answers."""
    torch.manual_seed(4)
    path = _save(nn.RNN(7, 5, nonlinearity="relu").state_dict(), tmp_path / "relu.pt")
    export_model(load_checkpoint(path, name="as_relu", kind="rnn", alphabet="abcdefg", nonlinearity="relu"), repository)
    export_model(load_checkpoint(path, name="as_tanh", kind="rnn", alphabet="abcdefg"), repository)
    assert Manifest.read(repository / "as_tanh" / "1").nonlinearity == "tanh"
    word = [[0, 1, 2, 3, 4, 5, 6]]
    results = []
    for name in ("as_relu", "as_tanh"):
        session = onnxruntime.InferenceSession(str(repository / name / "1" / ONNX_FILE), providers=["CPUExecutionProvider"])
        results.append(_run_onnx(session, word, 7, 1, 5)[0])
    assert float(np.max(np.abs(results[0] - results[1]))) > PARITY_TOLERANCE
    _assert_untouched(repository, {"as_relu", "as_tanh"})


def test_float64_checkpoint_is_accepted(tmp_path: Path, repository: Path) -> None:
    torch.manual_seed(5)
    original = nn.LSTM(4, 3).double()
    path = _save(original.state_dict(), tmp_path / "double.pt")
    manifest = export_model(load_checkpoint(path, name="double", kind="lstm", alphabet="helo"), repository)
    assert manifest.parity["onnx_max_abs_error"] <= PARITY_TOLERANCE
    with expected_torch_notices():
        state = torch.jit.load(str(repository / "double" / "1" / TORCHSCRIPT_FILE)).state_dict()
    for key, value in original.state_dict().items():
        assert state[f"rnn.{key}"].dtype == torch.float32
        assert torch.equal(state[f"rnn.{key}"], value.float())
    assert os.listdir(repository) == ["double"]


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, repository: Path, bad_value: float) -> None:
    state = nn.LSTM(4, 3).state_dict()
    state["weight_hh_l0"][1, 2] = bad_value
    failure = _attempt(_save(state, tmp_path / "model.pt"), repository)
    assert "weight_hh_l0 holds NaN or infinite values" in str(failure)
    _assert_untouched(repository)


def test_nonlinearity_is_refused_for_lstm(tmp_path: Path, repository: Path) -> None:
    path = _save(nn.LSTM(4, 3).state_dict(), tmp_path / "model.pt")
    failure = _attempt(path, repository, nonlinearity="relu")
    assert "--nonlinearity applies to rnn checkpoints only, not lstm" in str(failure)
    _assert_untouched(repository)
