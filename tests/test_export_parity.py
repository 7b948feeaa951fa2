"""Exported artifacts (model.onnx on onnxruntime CPU, model.pt on TorchScript) agree with eager PyTorch, word by word."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from export.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    Manifest,
    ManifestError,
    list_model_folders,
    sha256_file,
)
from export.models import BUILTIN_SPECS, load_checkpoint, seeded_model
from export.repository import export_model
from export.trace import ONNX_OPSET, PARITY_TOLERANCE, WordResult, expected_torch_notices, max_abs_error
from tests.helpers import LARGE_ALPHABET, LARGE_MODEL

pytestmark = pytest.mark.export

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]

ALL_MODELS = (*BUILTIN_SPECS, LARGE_MODEL)
RUNTIMES = ("onnx", "torchscript")
BATCH_SIZES = (1, 7, 64)
WORD_LENGTHS = (1, 2, 5, 17, 64)


@dataclass(frozen=True)
class Word:
    """Eager PyTorch's results for one word run alone: outputs [len, hidden], h_n/c_n [num_layers, hidden]."""

    outputs: FloatArray
    hidden: FloatArray
    cell: FloatArray | None


@dataclass
class Exported:
    """One exported model: its manifest, the eager module it came from, and both artifacts loaded."""

    name: str
    folder: Path
    manifest: Manifest
    module: nn.RNNBase
    session: onnxruntime.InferenceSession
    scripted: torch.jit.ScriptModule

    @property
    def lstm(self) -> bool:
        return self.manifest.kind == "lstm"

    @property
    def input_size(self) -> int:
        return self.manifest.input_size

    def zero_state(self, batch: int) -> FloatArray:
        return np.zeros((self.manifest.num_layers, batch, self.manifest.hidden_size), dtype=np.float32)

    def run(
        self,
        runtime: str,
        x: FloatArray,
        lengths: IntArray,
        h0: FloatArray | None = None,
        c0: FloatArray | None = None,
    ) -> tuple[FloatArray, FloatArray, FloatArray | None]:
        """Run one artifact on a padded batch; returns (outputs, h_n, c_n or None)."""
        batch = x.shape[0]
        h0 = self.zero_state(batch) if h0 is None else np.ascontiguousarray(h0, dtype=np.float32)
        if self.lstm:
            c0 = self.zero_state(batch) if c0 is None else np.ascontiguousarray(c0, dtype=np.float32)
        if runtime == "onnx":
            feed: dict[str, npt.NDArray[np.generic]] = {"x": x, "lengths": lengths.astype(np.int32), "h0": h0}
            if self.lstm:
                assert c0 is not None
                feed["c0"] = c0
            results = self.session.run(None, feed)
        elif runtime == "torchscript":
            args = [torch.from_numpy(x), torch.from_numpy(lengths.astype(np.int64)), torch.from_numpy(h0)]
            if self.lstm:
                assert c0 is not None
                args.append(torch.from_numpy(c0))
            with torch.no_grad():
                results = [tensor.numpy() for tensor in self.scripted(*args)]
        else:
            raise AssertionError(f"unknown runtime {runtime}")
        assert len(results) == (3 if self.lstm else 2)
        return results[0], results[1], results[2] if self.lstm else None


def encode(alphabet: str, text: str) -> list[int]:
    """Letter indices of a word."""
    return [alphabet.index(letter) for letter in text]


def pad(words: Sequence[Sequence[int]], input_size: int) -> tuple[FloatArray, IntArray]:
    """One-hot, zero-padded batch [batch, max_len, input_size] and lengths [batch], built here independently."""
    lengths = np.array([len(word) for word in words], dtype=np.int32)
    x = np.zeros((len(words), int(lengths.max()), input_size), dtype=np.float32)
    for row, word in enumerate(words):
        for step, index in enumerate(word):
            x[row, step, index] = 1.0
    return x, lengths


def eager(
    module: nn.RNNBase, word: Sequence[int], h0: FloatArray | None = None, c0: FloatArray | None = None
) -> Word:
    """Ground truth: the eager module on this word ALONE (batch of one), optionally from a given state."""
    x = torch.zeros(1, len(word), module.input_size)
    for step, index in enumerate(word):
        x[0, step, index] = 1.0
    state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
    if h0 is not None:
        h = torch.from_numpy(np.ascontiguousarray(h0, dtype=np.float32)).unsqueeze(1)
        if isinstance(module, nn.LSTM):
            assert c0 is not None
            state = (h, torch.from_numpy(np.ascontiguousarray(c0, dtype=np.float32)).unsqueeze(1))
        else:
            state = h
    with torch.no_grad():
        outputs, final = module(x, state)
    if isinstance(module, nn.LSTM):
        return Word(outputs[0].numpy(), final[0][:, 0].numpy(), final[1][:, 0].numpy())
    return Word(outputs[0].numpy(), final[:, 0].numpy(), None)


def error(expected: Word, outputs: FloatArray, hidden: FloatArray, cell: FloatArray | None) -> float:
    """Max abs difference over outputs, every layer's h_n and c_n; shape mismatch or NaN counts as infinite."""
    pairs = [(expected.outputs, outputs), (expected.hidden, hidden)]
    if expected.cell is not None or cell is not None:
        if expected.cell is None or cell is None:
            return float("inf")
        pairs.append((expected.cell, cell))
    worst = 0.0
    for want, got in pairs:
        if want.shape != got.shape:
            return float("inf")
        difference = np.abs(want.astype(np.float64) - got.astype(np.float64))
        if not np.all(np.isfinite(difference)):
            return float("inf")
        if difference.size:
            worst = max(worst, float(difference.max()))
    return worst


def assert_batch_matches(
    model: Exported,
    words: Sequence[Sequence[int]],
    lengths: IntArray,
    outputs: FloatArray,
    h_n: FloatArray,
    c_n: FloatArray | None,
    runtime: str,
    h0: FloatArray | None = None,
    c0: FloatArray | None = None,
) -> None:
    """Every row of a batch result equals eager PyTorch on that word alone, within PARITY_TOLERANCE."""
    layers, hidden = model.manifest.num_layers, model.manifest.hidden_size
    assert outputs.shape == (len(words), int(lengths.max()), hidden)
    assert h_n.shape == (layers, len(words), hidden)
    assert (c_n is not None) == model.lstm
    if c_n is not None:
        assert c_n.shape == (layers, len(words), hidden)
    for row, word in enumerate(words):
        expected = eager(
            model.module,
            word,
            None if h0 is None else h0[:, row],
            None if c0 is None else c0[:, row],
        )
        assert expected.outputs.shape == (len(word), hidden)
        assert expected.hidden.shape == (layers, hidden)
        got_outputs = outputs[row, : len(word)]
        got_cell = None if c_n is None else c_n[:, row]
        worst = error(expected, got_outputs, h_n[:, row], got_cell)
        assert worst <= PARITY_TOLERANCE, (
            f"{model.name} via {runtime}: word {row} (length {len(word)}) differs from eager by {worst:.3g}"
        )


@pytest.fixture(scope="module")
def eager_modules(large_checkpoint: Path) -> dict[str, nn.RNNBase]:
    """Eager modules rebuilt independently of the export: seeded built-ins, and the large checkpoint reloaded."""
    modules = {name: seeded_model(spec).module for name, spec in BUILTIN_SPECS.items()}
    modules[LARGE_MODEL] = load_checkpoint(
        large_checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET
    ).module
    return modules


@pytest.fixture(scope="module")
def exported(model_repository: Path, eager_modules: dict[str, nn.RNNBase]) -> dict[str, Exported]:
    """All four exported models of the shared repository, with an onnxruntime CPU session and a TorchScript module."""
    models: dict[str, Exported] = {}
    for name in ALL_MODELS:
        folder = model_repository / name / "1"
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(folder / ONNX_FILE), sess_options=options, providers=["CPUExecutionProvider"]
        )
        assert session.get_providers() == ["CPUExecutionProvider"]
        with expected_torch_notices():
            scripted = torch.jit.load(str(folder / TORCHSCRIPT_FILE))
        models[name] = Exported(name, folder, Manifest.read(folder), eager_modules[name], session, scripted)
    return models


def random_words(rng: np.random.Generator, lengths: Sequence[int], input_size: int) -> list[list[int]]:
    return [rng.integers(0, input_size, size=length).tolist() for length in lengths]


# ---- fixed shapes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", WORD_LENGTHS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_uniform_batch_matches_eager_per_word(
    exported: dict[str, Exported], name: str, runtime: str, batch: int, length: int
) -> None:
    model = exported[name]
    rng = np.random.default_rng([batch, length, len(name)])
    words = random_words(rng, [length] * batch, model.input_size)
    x, lengths = pad(words, model.input_size)
    assert_batch_matches(model, words, lengths, *model.run(runtime, x, lengths), runtime=runtime)


def _mixed_lengths(batch: int, rng: np.random.Generator) -> list[int]:
    """Every required length at least once (batch >= 5), the rest random in 1..64, shuffled."""
    lengths = list(WORD_LENGTHS) + rng.integers(1, 65, size=max(0, batch - len(WORD_LENGTHS))).tolist()
    rng.shuffle(lengths)
    return lengths[:batch]


@pytest.mark.parametrize("batch", (7, 64))
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_mixed_length_batch_matches_eager_per_word(
    exported: dict[str, Exported], name: str, runtime: str, batch: int
) -> None:
    model = exported[name]
    rng = np.random.default_rng([batch, 99, len(name)])
    lengths_list = _mixed_lengths(batch, rng)
    assert set(WORD_LENGTHS) <= set(lengths_list)
    words = random_words(rng, lengths_list, model.input_size)
    x, lengths = pad(words, model.input_size)
    assert_batch_matches(model, words, lengths, *model.run(runtime, x, lengths), runtime=runtime)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_padded_output_positions_are_zero(exported: dict[str, Exported], name: str, runtime: str) -> None:
    model = exported[name]
    rng = np.random.default_rng(7)
    words = random_words(rng, [64, 1, 2, 17, 5, 63, 3], model.input_size)
    x, lengths = pad(words, model.input_size)
    outputs, _, _ = model.run(runtime, x, lengths)
    for row, length in enumerate(lengths):
        padding = outputs[row, int(length) :]
        assert padding.shape == (64 - int(length), model.manifest.hidden_size)
        assert np.all(padding == 0.0), f"{name} via {runtime}: row {row} has non-zero outputs past length {length}"
        # The real positions are not all zero, so the check above is not vacuous.
        assert np.any(outputs[row, : int(length)] != 0.0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_distinct_words_give_distinct_states(exported: dict[str, Exported], name: str) -> None:
    """Guards the parity tests against a degenerate model whose states never move."""
    model = exported[name]
    alphabet = model.manifest.alphabet
    words = [encode(alphabet, "hel"), encode(alphabet, "leh"), encode(alphabet, "ooo")]
    x, lengths = pad(words, model.input_size)
    _, h_n, _ = model.run("onnx", x, lengths)
    for a in range(len(words)):
        for b in range(a + 1, len(words)):
            assert float(np.max(np.abs(h_n[:, a] - h_n[:, b]))) > 1000 * PARITY_TOLERANCE


def test_max_abs_error_does_not_hide_nan() -> None:
    """export.trace.max_abs_error gates export parity; an artifact answering NaN must not count as exact."""
    zeros = np.zeros((3, 2), dtype=np.float32)
    nans = np.full((3, 2), np.nan, dtype=np.float32)
    expected = [WordResult(zeros, zeros[:1], None)]
    actual = [WordResult(nans, nans[:1], None)]
    worst = max_abs_error(expected, actual)
    assert not worst <= PARITY_TOLERANCE, f"NaN outputs were reported as max abs error {worst}"


# ---- plain padding is not enough ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_plain_padding_gives_wrong_final_states(exported: dict[str, Exported], name: str) -> None:
    """Without lengths (every length = max_len) shorter words' final states are wrong; with lengths they are right."""
    model = exported[name]
    rng = np.random.default_rng(5)
    words = random_words(rng, [17, 2, 5, 1, 17], model.input_size)
    x, lengths = pad(words, model.input_size)
    plain = np.full_like(lengths, int(lengths.max()))

    outputs, h_n, c_n = model.run("onnx", x, plain)
    right_outputs, right_h, right_c = model.run("onnx", x, lengths)
    assert_batch_matches(model, words, lengths, right_outputs, right_h, right_c, runtime="onnx")

    for row, word in enumerate(words):
        expected = eager(model.module, word)
        # Outputs up to the word's end are unaffected by later padding...
        early = float(np.max(np.abs(outputs[row, : len(word)] - expected.outputs)))
        assert early <= PARITY_TOLERANCE
        state_error = float(np.max(np.abs(h_n[:, row] - expected.hidden)))
        if c_n is not None:
            assert expected.cell is not None
            state_error = max(state_error, float(np.max(np.abs(c_n[:, row] - expected.cell))))
        if len(word) == int(lengths.max()):
            assert state_error <= PARITY_TOLERANCE
        else:
            # ...but every layer keeps stepping through the padding, so the final state drifts.
            assert state_error > PARITY_TOLERANCE, f"{name}: row {row} final state unaffected by padding"
            assert np.any(outputs[row, len(word) :] != 0.0)


# ---- continuation from a returned state -----------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_hello_in_one_go_equals_hel_then_lo(exported: dict[str, Exported], name: str, runtime: str) -> None:
    model = exported[name]
    alphabet = model.manifest.alphabet
    whole, head, tail = (encode(alphabet, text) for text in ("hello", "hel", "lo"))
    expected = eager(model.module, whole)

    x, lengths = pad([whole], model.input_size)
    out_whole, h_whole, c_whole = model.run(runtime, x, lengths)
    assert error(expected, out_whole[0], h_whole[:, 0], None if c_whole is None else c_whole[:, 0]) <= PARITY_TOLERANCE

    x, lengths = pad([head], model.input_size)
    out_head, h_head, c_head = model.run(runtime, x, lengths)
    x, lengths = pad([tail], model.input_size)
    out_tail, h_tail, c_tail = model.run(runtime, x, lengths, h0=h_head, c0=c_head)
    assert (c_tail is not None) == model.lstm

    joined = np.concatenate([out_head[0], out_tail[0]])
    c_last = None if c_tail is None else c_tail[:, 0]
    assert error(expected, joined, h_tail[:, 0], c_last) <= PARITY_TOLERANCE
    at_once = Word(out_whole[0], h_whole[:, 0], None if c_whole is None else c_whole[:, 0])
    assert error(at_once, joined, h_tail[:, 0], c_last) <= PARITY_TOLERANCE
    # The tail really started from the carried state: from zeros it would differ.
    x, lengths = pad([tail], model.input_size)
    _, h_fresh, _ = model.run(runtime, x, lengths)
    assert float(np.max(np.abs(h_fresh - h_tail))) > PARITY_TOLERANCE


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_batched_continuation_with_reordered_rows(exported: dict[str, Exported], name: str, runtime: str) -> None:
    """Prefixes of mixed lengths, then suffixes of mixed lengths in reverse row order, from each row's own state."""
    model = exported[name]
    rng = np.random.default_rng(11)
    words = random_words(rng, [2, 9, 40, 5, 17, 3, 64], model.input_size)
    splits = [int(rng.integers(1, len(word))) for word in words]
    heads = [word[:cut] for word, cut in zip(words, splits, strict=True)]
    tails = [word[cut:] for word, cut in zip(words, splits, strict=True)][::-1]

    x, lengths = pad(heads, model.input_size)
    out_head, h_head, c_head = model.run(runtime, x, lengths)
    assert_batch_matches(model, heads, lengths, out_head, h_head, c_head, runtime=runtime)

    h0 = np.ascontiguousarray(h_head[:, ::-1])
    c0 = None if c_head is None else np.ascontiguousarray(c_head[:, ::-1])
    x, lengths = pad(tails, model.input_size)
    out_tail, h_tail, c_tail = model.run(runtime, x, lengths, h0=h0, c0=c0)
    # Each tail equals eager on that tail alone, started from the state its head returned.
    assert_batch_matches(model, tails, lengths, out_tail, h_tail, c_tail, runtime=runtime, h0=h0, c0=c0)

    for row, word in enumerate(words):
        tail_row = len(words) - 1 - row
        joined = np.concatenate([out_head[row, : splits[row]], out_tail[tail_row, : len(word) - splits[row]]])
        cell = None if c_tail is None else c_tail[:, tail_row]
        assert error(eager(model.module, word), joined, h_tail[:, tail_row], cell) <= PARITY_TOLERANCE


# ---- property tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_batches_onnx_matches_eager(exported: dict[str, Exported], name: str, data: st.DataObject) -> None:
    model = exported[name]
    alphabet = model.manifest.alphabet
    texts = data.draw(
        st.lists(st.text(alphabet=alphabet, min_size=1, max_size=30), min_size=1, max_size=8), label="words"
    )
    words = [encode(alphabet, text) for text in texts]
    x, lengths = pad(words, model.input_size)
    assert_batch_matches(model, words, lengths, *model.run("onnx", x, lengths), runtime="onnx")


@pytest.mark.parametrize("name", ALL_MODELS)
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_split_continuation_onnx(exported: dict[str, Exported], name: str, data: st.DataObject) -> None:
    model = exported[name]
    alphabet = model.manifest.alphabet
    text = data.draw(st.text(alphabet=alphabet, min_size=2, max_size=30), label="word")
    cut = data.draw(st.integers(1, len(text) - 1), label="cut")
    word = encode(alphabet, text)
    x, lengths = pad([word[:cut]], model.input_size)
    out_head, h_head, c_head = model.run("onnx", x, lengths)
    x, lengths = pad([word[cut:]], model.input_size)
    out_tail, h_tail, c_tail = model.run("onnx", x, lengths, h0=h_head, c0=c_head)
    joined = np.concatenate([out_head[0], out_tail[0]])
    cell = None if c_tail is None else c_tail[:, 0]
    assert error(eager(model.module, word), joined, h_tail[:, 0], cell) <= PARITY_TOLERANCE


# ---- the manifest and the ONNX graph --------------------------------------------------------------------------


EXPECTED_ARCHITECTURE = {
    "rnn": ("rnn", "helo", 2, 1, "tanh"),
    "rnn_multi_layers": ("rnn", "helo", 2, 3, "tanh"),
    "lstm": ("lstm", "helo", 2, 3, None),
    LARGE_MODEL: ("lstm", LARGE_ALPHABET, 64, 2, None),
}


@pytest.mark.parametrize("name", ALL_MODELS)
def test_manifest_fields(model_repository: Path, large_checkpoint: Path, name: str) -> None:
    folder = model_repository / name / "1"
    manifest = Manifest.read(folder)
    kind, alphabet, hidden, layers, nonlinearity = EXPECTED_ARCHITECTURE[name]
    assert manifest.name == name
    assert manifest.kind == kind
    assert manifest.has_cell_state == (kind == "lstm")
    assert manifest.alphabet == alphabet
    assert manifest.input_size == len(alphabet)
    assert manifest.hidden_size == hidden
    assert manifest.num_layers == layers
    assert manifest.nonlinearity == nonlinearity
    assert manifest.bias is True
    assert manifest.layout == "batch_first"
    assert manifest.onnx_opset == ONNX_OPSET

    size = len(alphabet)
    expected_inputs = [
        ("x", "float32", ["batch", "max_len", size]),
        ("lengths", "int32", ["batch"]),
        ("h0", "float32", [layers, "batch", hidden]),
    ]
    expected_outputs = [
        ("outputs", "float32", ["batch", "max_len", hidden]),
        ("h_n", "float32", [layers, "batch", hidden]),
    ]
    if kind == "lstm":
        expected_inputs.append(("c0", "float32", [layers, "batch", hidden]))
        expected_outputs.append(("c_n", "float32", [layers, "batch", hidden]))
    assert [(s.name, s.dtype, s.shape) for s in manifest.onnx_inputs] == expected_inputs
    assert [(s.name, s.dtype, s.shape) for s in manifest.onnx_outputs] == expected_outputs

    assert manifest.versions["torch"] == torch.__version__
    assert manifest.versions["onnx"] == onnx.__version__

    assert set(manifest.artifacts) == {ONNX_FILE, TORCHSCRIPT_FILE}
    for file_name, digest in manifest.artifacts.items():
        assert digest == sha256_file(folder / file_name)
    manifest.verify_artifacts(folder)

    if name == LARGE_MODEL:
        assert manifest.weights == {
            "source": "checkpoint",
            "path": str(large_checkpoint),
            "sha256": sha256_file(large_checkpoint),
        }
    else:
        assert manifest.weights == {"source": "seed", "seed": 0}

    assert manifest.parity["tolerance"] == PARITY_TOLERANCE
    for key in ("onnx_max_abs_error", "torchscript_max_abs_error"):
        value = manifest.parity[key]
        assert isinstance(value, float) and 0.0 <= value <= PARITY_TOLERANCE, (key, value)

    # The manifest on disk is exactly its stable serialisation.
    assert (folder / MANIFEST_FILE).read_text(encoding="utf-8") == manifest.to_json()


def test_repository_lists_exactly_the_four_models(model_repository: Path) -> None:
    assert [folder.name for folder in list_model_folders(model_repository)] == sorted(ALL_MODELS)
    # No staging or retired folders were left behind by the exports.
    assert sorted(child.name for child in model_repository.iterdir()) == sorted(ALL_MODELS)
    for name in ALL_MODELS:
        assert [child.name for child in (model_repository / name).iterdir()] == ["1"]
        assert sorted(child.name for child in (model_repository / name / "1").iterdir()) == sorted(
            [MANIFEST_FILE, ONNX_FILE, TORCHSCRIPT_FILE]
        )


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [dim.dim_param if dim.dim_param else dim.dim_value for dim in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_onnx_graph_inputs_and_outputs(exported: dict[str, Exported], name: str) -> None:
    model = exported[name]
    manifest = model.manifest
    graph_model = onnx.load(str(model.folder / ONNX_FILE))
    onnx.checker.check_model(graph_model, full_check=True)
    graph = graph_model.graph

    expected_names = ["x", "lengths", "h0"] + (["c0"] if model.lstm else [])
    assert [value.name for value in graph.input] == expected_names
    assert [value.name for value in graph.output] == ["outputs", "h_n"] + (["c_n"] if model.lstm else [])
    element = {"float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32}
    for value, spec in zip(graph.input, manifest.onnx_inputs, strict=True):
        assert value.name == spec.name
        assert value.type.tensor_type.elem_type == element[spec.dtype]
        assert _dims(value) == spec.shape
    for value, spec in zip(graph.output, manifest.onnx_outputs, strict=True):
        assert value.type.tensor_type.elem_type == element[spec.dtype]
        assert _dims(value) == spec.shape
    x_dims = _dims(graph.input[0])
    assert isinstance(x_dims[0], str) and isinstance(x_dims[1], str), "batch and max_len must be dynamic"
    assert isinstance(_dims(graph.input[2])[1], str), "h0's batch axis must be dynamic"

    default_domain = [entry.version for entry in graph_model.opset_import if entry.domain in ("", "ai.onnx")]
    assert default_domain == [manifest.onnx_opset]

    recurrent = [node for node in graph.node if node.op_type in ("RNN", "LSTM", "GRU")]
    assert len(recurrent) == manifest.num_layers
    for node in recurrent:
        assert node.op_type == manifest.kind.upper()
        assert node.input[4] == "lengths", f"{node.name} does not take sequence_lens from the lengths input"

    session_inputs = model.session.get_inputs()
    assert [value.name for value in session_inputs] == expected_names
    assert [value.type for value in session_inputs][:2] == ["tensor(float)", "tensor(int32)"]
    assert isinstance(session_inputs[0].shape[0], str) and isinstance(session_inputs[0].shape[1], str)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_altered_onnx_byte_fails_verification(model_repository: Path, tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    shutil.copytree(model_repository / name / "1", folder)
    manifest = Manifest.read(folder)
    manifest.verify_artifacts(folder)  # the untouched copy is valid

    onnx_path = folder / ONNX_FILE
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.onnx: sha256 .* does not match"):
        manifest.verify_artifacts(folder)
    # The shared fixture's copy is untouched.
    Manifest.read(model_repository / name / "1").verify_artifacts(model_repository / name / "1")


def test_missing_artifact_fails_verification(model_repository: Path, tmp_path: Path) -> None:
    folder = tmp_path / "lstm"
    shutil.copytree(model_repository / "lstm" / "1", folder)
    (folder / TORCHSCRIPT_FILE).unlink()
    with pytest.raises(ManifestError, match=r"model\.pt: artifact listed in the manifest is missing"):
        Manifest.read(folder).verify_artifacts(folder)


# ---- determinism -----------------------------------------------------------------------------------------------


def _scripted_state(path: Path) -> dict[str, torch.Tensor]:
    with expected_torch_notices():
        return dict(torch.jit.load(str(path)).state_dict())


def test_export_is_deterministic(tmp_path: Path, model_repository: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for repository in (first, second):
        for spec in BUILTIN_SPECS.values():
            export_model(seeded_model(spec), repository)

    for name, spec in BUILTIN_SPECS.items():
        onnx_bytes = (first / name / "1" / ONNX_FILE).read_bytes()
        assert onnx_bytes == (second / name / "1" / ONNX_FILE).read_bytes(), f"{name}: model.onnx differs between exports"
        assert onnx_bytes == (model_repository / name / "1" / ONNX_FILE).read_bytes()

        state_first = _scripted_state(first / name / "1" / TORCHSCRIPT_FILE)
        state_second = _scripted_state(second / name / "1" / TORCHSCRIPT_FILE)
        reference = {f"rnn.{key}": value for key, value in seeded_model(spec).module.state_dict().items()}
        assert sorted(state_first) == sorted(state_second) == sorted(reference)
        for key, value in reference.items():
            assert torch.equal(state_first[key], value), f"{name}: {key} differs from the seeded module"
            assert torch.equal(state_second[key], value)

        one, two = Manifest.read(first / name / "1"), Manifest.read(second / name / "1")
        assert one.artifacts[ONNX_FILE] == two.artifacts[ONNX_FILE]
        assert one.weights == two.weights == {"source": "seed", "seed": 0}


def test_different_seed_gives_different_onnx(tmp_path: Path, model_repository: Path) -> None:
    """The byte comparison above can fail: other weights give other bytes."""
    manifest = export_model(seeded_model(BUILTIN_SPECS["lstm"], seed=1), tmp_path)
    assert manifest.weights == {"source": "seed", "seed": 1}
    assert (tmp_path / "lstm" / "1" / ONNX_FILE).read_bytes() != (model_repository / "lstm" / "1" / ONNX_FILE).read_bytes()
