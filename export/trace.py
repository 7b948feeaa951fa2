"""Turn a loaded module into model.pt (TorchScript) and model.onnx, and measure their parity with eager PyTorch.

Exact per-word results for batches of mixed lengths:
- TorchScript: the wrapper packs the batch (pack_padded_sequence), so every layer stops at each word's end.
- ONNX: the TorchScript-based exporter emits native RNN/LSTM/GRU nodes; we then feed a graph input `lengths`
  into each node's `sequence_lens`, which makes onnxruntime stop every layer at each word's end.
Plain padding would not do: lower layers would keep stepping through the padding.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from export.manifest import TensorSpec

ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-5
"""Max absolute error allowed between eager PyTorch and an artifact, float32 on CPU. The one place it is stated."""

_RNN_OPS = ("RNN", "LSTM", "GRU")

# Deprecation and tracer notices torch 2.13 prints for the exporters we deliberately use (see README,
# "Deprecations"). Each is matched by message, only inside export calls; anything else still shows.
_EXPECTED_NOTICES: tuple[tuple[str, type[Warning]], ...] = (
    (r"You are using the legacy TorchScript-based ONNX export", DeprecationWarning),
    (r"The feature will be removed\. Please remove usage of this function", DeprecationWarning),
    (r"`torch\.jit\.\w+` is deprecated", DeprecationWarning),
    (r"torch\.jit\.\w+ is deprecated", DeprecationWarning),
    (r"Converting a tensor to a Python boolean might cause the trace to be incorrect", torch.jit.TracerWarning),
    # We make variable lengths exact through sequence_lens; this generic warning does not apply.
    (r"Exporting a model to ONNX with a batch_size other than 1, with a variable length", UserWarning),
)


@contextlib.contextmanager
def expected_torch_notices() -> Iterator[None]:
    """Silence only the known deprecation/tracer notices of the legacy exporters and TorchScript."""
    with warnings.catch_warnings():
        for message, category in _EXPECTED_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


class _CharRnnState(nn.Module):
    """RNN or GRU: (x, lengths, h0) -> (outputs, h_n), exact per word through packing."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, h_n = self.rnn(packed, h0)
        outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=x.size(1))
        return outputs, h_n


class _CharLstm(nn.Module):
    """LSTM: (x, lengths, h0, c0) -> (outputs, h_n, c_n), exact per word through packing."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.rnn = lstm

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, (h_n, c_n) = self.rnn(packed, (h0, c0))
        outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=x.size(1))
        return outputs, h_n, c_n


class _PaddedRnn(nn.Module):
    """What the ONNX exporter traces for RNN/GRU; lengths are wired in afterwards as sequence_lens."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, h_n = self.rnn(x, h0)
        return outputs, h_n


class _PaddedLstm(nn.Module):
    """What the ONNX exporter traces for LSTM; lengths are wired in afterwards as sequence_lens."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.rnn = lstm

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs, (h_n, c_n) = self.rnn(x, (h0, c0))
        return outputs, h_n, c_n


def _is_lstm(module: nn.RNNBase) -> bool:
    return isinstance(module, nn.LSTM)


def io_specs(module: nn.RNNBase) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """ONNX graph inputs and outputs, with dynamic axes named 'batch' and 'max_len'."""
    layers, hidden, size = module.num_layers, module.hidden_size, module.input_size
    inputs = [
        TensorSpec("x", "float32", ["batch", "max_len", size]),
        TensorSpec("lengths", "int32", ["batch"]),
        TensorSpec("h0", "float32", [layers, "batch", hidden]),
    ]
    outputs = [
        TensorSpec("outputs", "float32", ["batch", "max_len", hidden]),
        TensorSpec("h_n", "float32", [layers, "batch", hidden]),
    ]
    if _is_lstm(module):
        inputs.append(TensorSpec("c0", "float32", [layers, "batch", hidden]))
        outputs.append(TensorSpec("c_n", "float32", [layers, "batch", hidden]))
    return inputs, outputs


def _example_inputs(module: nn.RNNBase, batch: int = 2, max_len: int = 3) -> tuple[torch.Tensor, ...]:
    x = torch.zeros(batch, max_len, module.input_size)
    x[:, :, 0] = 1.0
    h0 = torch.zeros(module.num_layers, batch, module.hidden_size)
    return (x, h0, h0.clone()) if _is_lstm(module) else (x, h0)


def export_torchscript(module: nn.RNNBase, path: Path) -> None:
    """Script the packing wrapper (dynamic batch and length by construction) and save it."""
    wrapper = (_CharLstm(module) if _is_lstm(module) else _CharRnnState(module)).eval()
    with expected_torch_notices():
        scripted = torch.jit.script(wrapper)
        scripted.save(str(path))


def export_onnx(module: nn.RNNBase, path: Path) -> None:
    """Trace with the TorchScript-based exporter, then wire `lengths` into every recurrent node."""
    inputs, outputs = io_specs(module)
    padded = (_PaddedLstm(module) if _is_lstm(module) else _PaddedRnn(module)).eval()
    traced_inputs = [spec for spec in inputs if spec.name != "lengths"]
    dynamic_axes = {
        spec.name: {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str) and dim != "num_layers"}
        for spec in traced_inputs + outputs
    }
    buffer = io.BytesIO()
    with expected_torch_notices(), torch.no_grad():
        torch.onnx.export(
            padded,
            _example_inputs(module),
            buffer,
            dynamo=False,
            input_names=[spec.name for spec in traced_inputs],
            output_names=[spec.name for spec in outputs],
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    graph_model = onnx.load_from_string(buffer.getvalue())
    _wire_sequence_lengths(graph_model)
    onnx.checker.check_model(graph_model, full_check=True)
    path.write_bytes(graph_model.SerializeToString())


def _wire_sequence_lengths(model: onnx.ModelProto) -> None:
    graph = model.graph
    recurrent = [node for node in graph.node if node.op_type in _RNN_OPS]
    if not recurrent:
        raise RuntimeError("the exported graph has no RNN/LSTM/GRU node; cannot make mixed lengths exact")
    lengths = helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"])
    # Keep the documented input order: x, lengths, h0[, c0].
    existing = list(graph.input)
    del graph.input[:]
    graph.input.extend([existing[0], lengths, *existing[1:]])
    for node in recurrent:
        while len(node.input) < 5:
            node.input.append("")
        if node.input[4]:
            raise RuntimeError(f"{node.name} already has sequence_lens {node.input[4]!r}")
        node.input[4] = "lengths"


# ---- eager reference and parity -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WordResult:
    """One word's results: outputs [len, hidden], hidden [num_layers, hidden], cell [num_layers, hidden] or None."""

    outputs: npt.NDArray[np.float32]
    hidden: npt.NDArray[np.float32]
    cell: npt.NDArray[np.float32] | None


def one_hot(indices: Sequence[int], size: int) -> torch.Tensor:
    """[len, size] float32 one-hot rows for a word's letter indices."""
    rows = torch.zeros(len(indices), size)
    rows[torch.arange(len(indices)), torch.as_tensor(list(indices), dtype=torch.long)] = 1.0
    return rows


def eager_word(
    module: nn.RNNBase,
    indices: Sequence[int],
    h0: npt.NDArray[np.float32] | None = None,
    c0: npt.NDArray[np.float32] | None = None,
) -> WordResult:
    """Ground truth: the eager module run on one word alone (batch of 1)."""
    x = one_hot(indices, module.input_size).unsqueeze(0)
    state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
    if h0 is not None:
        h = torch.as_tensor(np.asarray(h0, dtype=np.float32)).unsqueeze(1)
        if _is_lstm(module):
            c = torch.as_tensor(np.asarray(c0 if c0 is not None else np.zeros_like(h0), dtype=np.float32)).unsqueeze(1)
            state = (h, c)
        else:
            state = h
    with torch.no_grad():
        outputs, final = module(x, state)
    if _is_lstm(module):
        h_n, c_n = final
        return WordResult(outputs[0].numpy(), h_n[:, 0].numpy(), c_n[:, 0].numpy())
    return WordResult(outputs[0].numpy(), final[:, 0].numpy(), None)


def batch_inputs(
    words: Sequence[Sequence[int]], input_size: int, num_layers: int, hidden_size: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Padded one-hot batch [batch, max_len, input_size], lengths [batch], zero state [num_layers, batch, hidden]."""
    lengths = np.array([len(word) for word in words], dtype=np.int32)
    x = np.zeros((len(words), int(lengths.max()), input_size), dtype=np.float32)
    for row, word in enumerate(words):
        x[row, np.arange(len(word)), np.asarray(word, dtype=np.int64)] = 1.0
    return x, lengths, np.zeros((num_layers, len(words), hidden_size), dtype=np.float32)


def max_abs_error(expected: Sequence[WordResult], actual: Sequence[WordResult]) -> float:
    """Largest absolute difference over every array of every word; shapes must agree."""
    worst = 0.0
    for want, got in zip(expected, actual, strict=True):
        pairs = [(want.outputs, got.outputs), (want.hidden, got.hidden)]
        if want.cell is not None or got.cell is not None:
            if want.cell is None or got.cell is None:
                return float("inf")
            pairs.append((want.cell, got.cell))
        for a, b in pairs:
            if a.shape != b.shape:
                return float("inf")
            if a.size:
                difference = np.abs(a - b)
                if not np.all(np.isfinite(difference)):  # max() would silently drop a NaN
                    return float("inf")
                worst = max(worst, float(difference.max()))
    return worst


def split_batch(
    lengths: npt.NDArray[np.int32],
    outputs: npt.NDArray[np.float32],
    h_n: npt.NDArray[np.float32],
    c_n: npt.NDArray[np.float32] | None,
) -> list[WordResult]:
    """Cut batch outputs back into per-word results."""
    return [
        WordResult(
            outputs[row, : int(length)],
            h_n[:, row],
            None if c_n is None else c_n[:, row],
        )
        for row, length in enumerate(lengths)
    ]


def run_torchscript(path: Path, words: Sequence[Sequence[int]], module: nn.RNNBase) -> list[WordResult]:
    """Run model.pt on a padded batch of words."""
    with expected_torch_notices():
        scripted = torch.jit.load(str(path))
    x, lengths, h0 = batch_inputs(words, module.input_size, module.num_layers, module.hidden_size)
    args = [torch.from_numpy(x), torch.from_numpy(lengths.astype(np.int64)), torch.from_numpy(h0)]
    if _is_lstm(module):
        args.append(torch.from_numpy(h0.copy()))
    with torch.no_grad():
        results = [tensor.numpy() for tensor in scripted(*args)]
    return split_batch(lengths, results[0], results[1], results[2] if len(results) > 2 else None)


def run_onnx(path: Path, words: Sequence[Sequence[int]], module: nn.RNNBase) -> list[WordResult]:
    """Run model.onnx on a padded batch of words with onnxruntime's CPU provider."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, lengths, h0 = batch_inputs(words, module.input_size, module.num_layers, module.hidden_size)
    feed = {"x": x, "lengths": lengths, "h0": h0}
    if _is_lstm(module):
        feed["c0"] = h0.copy()
    results = session.run(None, feed)
    return split_batch(lengths, results[0], results[1], results[2] if len(results) > 2 else None)


PARITY_LENGTHS = (1, 2, 5, 17, 64, 3, 1)
"""Word lengths of the export-time parity batch: mixed, and unlike the traced example (batch 2, length 3)."""


def measure_parity(module: nn.RNNBase, folder: Path, onnx_file: str, torchscript_file: str, seed: int = 0) -> dict[str, float]:
    """Max abs error of each artifact against eager PyTorch on a mixed-length batch of random words."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(0, module.input_size, size=length).tolist() for length in PARITY_LENGTHS]
    expected = [eager_word(module, word) for word in words]
    return {
        "onnx_max_abs_error": max_abs_error(expected, run_onnx(folder / onnx_file, words, module)),
        "torchscript_max_abs_error": max_abs_error(expected, run_torchscript(folder / torchscript_file, words, module)),
    }
