"""Model folders built with onnx.helper and numpy alone, for the fast `unit` tests (no torch).

Each graph has the product's exact interface (x [batch, max_len, input], lengths, h0/c0 [layers, batch, hidden]
-> outputs, h_n, c_n) and stops every layer at each word's end through ONNX's sequence_lens, as the exported
models do; the weights are random. They exercise the real server code on real onnxruntime sessions. Parity
against eager PyTorch is the job of the `export` and `e2e` tests, which use charrnn-export's own artifacts.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.manifest import ONNX_FILE, Manifest, TensorSpec, sha256_file

OPSET = 17
IR_VERSION = 8
"""What onnxruntime reads (the newest onnx writes an IR version that onnxruntime may not know yet)."""
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
OPS = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}


def build_graph(kind: str, input_size: int, hidden: int, layers: int, seed: int) -> onnx.ModelProto:
    """A stacked unidirectional RNN/GRU/LSTM graph with random weights and the product's tensor names."""
    rng = np.random.default_rng(seed)
    gates = GATES[kind]
    nodes: list[onnx.NodeProto] = [
        helper.make_node("Transpose", ["x"], ["x_time_first"], perm=[1, 0, 2]),  # [max_len, batch, input]
        helper.make_node("Cast", ["lengths"], ["sequence_lens"], to=TensorProto.INT32),
    ]
    initialisers: list[onnx.TensorProto] = []
    layer_input, hidden_outs, cell_outs = "x_time_first", [], []
    for layer in range(layers):
        size = input_size if layer == 0 else hidden
        weights = {
            f"W{layer}": rng.uniform(-0.5, 0.5, (1, gates * hidden, size)),
            f"R{layer}": rng.uniform(-0.5, 0.5, (1, gates * hidden, hidden)),
            f"B{layer}": rng.uniform(-0.2, 0.2, (1, 2 * gates * hidden)),
        }
        initialisers += [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()]
        initialisers.append(numpy_helper.from_array(np.array([layer], dtype=np.int64), f"layer{layer}"))
        nodes.append(helper.make_node("Gather", ["h0", f"layer{layer}"], [f"h0_{layer}"], axis=0))
        inputs = [layer_input, f"W{layer}", f"R{layer}", f"B{layer}", "sequence_lens", f"h0_{layer}"]
        outputs = [f"y{layer}", f"h_n{layer}"]
        if kind == "lstm":
            nodes.append(helper.make_node("Gather", ["c0", f"layer{layer}"], [f"c0_{layer}"], axis=0))
            inputs.append(f"c0_{layer}")
            outputs.append(f"c_n{layer}")
            cell_outs.append(f"c_n{layer}")
        attributes = {"linear_before_reset": 1} if kind == "gru" else {}
        nodes.append(helper.make_node(OPS[kind], inputs, outputs, hidden_size=hidden, **attributes))
        nodes.append(helper.make_node("Squeeze", [f"y{layer}", "axis1"], [f"y{layer}_squeezed"]))
        layer_input = f"y{layer}_squeezed"  # [max_len, batch, hidden]
        hidden_outs.append(f"h_n{layer}")
    initialisers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    nodes += [
        helper.make_node("Transpose", [layer_input], ["outputs"], perm=[1, 0, 2]),
        helper.make_node("Concat", hidden_outs, ["h_n"], axis=0),
    ]
    if kind == "lstm":
        nodes.append(helper.make_node("Concat", cell_outs, ["c_n"], axis=0))

    def tensor(name: str, *shape: int | str, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, list(shape))

    inputs = [tensor("x", "batch", "max_len", input_size), tensor("lengths", "batch", dtype=TensorProto.INT32),
              tensor("h0", layers, "batch", hidden)]
    outputs = [tensor("outputs", "batch", "max_len", hidden), tensor("h_n", layers, "batch", hidden)]
    if kind == "lstm":
        inputs.append(tensor("c0", layers, "batch", hidden))
        outputs.append(tensor("c_n", layers, "batch", hidden))
    graph = helper.make_graph(nodes, f"{kind}_{layers}", inputs, outputs, initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def write_model(
    repository: Path, name: str, kind: str, alphabet: str, hidden: int = 2, layers: int = 1, seed: int = 0,
    version: int | None = None,
) -> Path:
    """Write <repository>/<name>/<version>/ (model.onnx + manifest.json) as charrnn-export lays it out, or with
    no version the flat layout of earlier releases, <repository>/<name>/ (read as version 1)."""
    folder = repository / name if version is None else repository / name / str(version)
    folder.mkdir(parents=True)
    onnx.save(build_graph(kind, len(alphabet), hidden, layers, seed), str(folder / ONNX_FILE))
    specs = [
        TensorSpec("x", "float32", ["batch", "max_len", len(alphabet)]),
        TensorSpec("lengths", "int32", ["batch"]),
        TensorSpec("h0", "float32", [layers, "batch", hidden]),
    ]
    outputs = [
        TensorSpec("outputs", "float32", ["batch", "max_len", hidden]),
        TensorSpec("h_n", "float32", [layers, "batch", hidden]),
    ]
    if kind == "lstm":
        specs.append(TensorSpec("c0", "float32", [layers, "batch", hidden]))
        outputs.append(TensorSpec("c_n", "float32", [layers, "batch", hidden]))
    Manifest(
        name=name, kind=kind, input_size=len(alphabet), hidden_size=hidden, num_layers=layers,
        nonlinearity="tanh" if kind == "rnn" else None, bias=True, alphabet=alphabet, onnx_opset=OPSET,
        onnx_inputs=specs, onnx_outputs=outputs, artifacts={ONNX_FILE: sha256_file(folder / ONNX_FILE)},
        weights={"source": "seed", "seed": seed}, versions={"onnx": onnx.__version__, "python": platform.python_version()},
        parity={},
    ).write(folder)
    return folder


UNIT_MODELS = {
    # name: (kind, alphabet, hidden, layers): the built-ins' shapes, plus a wide alphabet
    "rnn": ("rnn", "helo", 2, 1),
    "rnn_multi_layers": ("rnn", "helo", 2, 3),
    "lstm": ("lstm", "helo", 2, 3),
    "gru": ("gru", "helo", 3, 2),
    "wide_lstm": ("lstm", "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123-", 16, 2),
}


def write_unit_repository(repository: Path) -> Path:
    """Every UNIT_MODELS entry under one repository."""
    for seed, (name, (kind, alphabet, hidden, layers)) in enumerate(UNIT_MODELS.items()):
        write_model(repository, name, kind, alphabet, hidden, layers, seed)
    return repository
