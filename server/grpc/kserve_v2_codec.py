"""The Open Inference Protocol (KServe V2) codec: ModelInferRequest tensors -> words and states, rows -> tensors.

Tensors per model (README "Open Inference Protocol"):
  inputs   WORDS           BYTES [words] or [words, 1]   one UTF-8 string per word
           INITIAL_HIDDEN  FP32  [words, num_layers, hidden]   optional
           INITIAL_CELL    FP32  [words, num_layers, hidden]   optional, LSTM only
  outputs  OUTPUTS         FP32  [words, max_len, hidden]   zero past each word's end
           LENGTHS         INT32 [words]
           HIDDEN          FP32  [words, num_layers, hidden]
           CELL            FP32  [words, num_layers, hidden]   LSTM only

Inputs are read from `raw_input_contents` (what tritonclient sends; a BYTES element is a 4-byte little-endian
length, then the bytes) or from the typed `contents`. Outputs always go back in `raw_output_contents`
(tritonclient's as_numpy reads only raw or bytes contents). The states are words-first here, as the protocol's
batch axis requires; the core's are layer-first (RunOutputs), so they are transposed on the way in and out.
Every problem is a core InvalidRequestError (status.py maps it), never a protocol-specific exception.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from proto.kserve import grpc_service_pb2 as pb
from server.core.engine import InitialState, RequestRows
from server.core.errors import InvalidRequestError, Reason
from server.core.runtime import ModelRuntime

WORDS, INITIAL_HIDDEN, INITIAL_CELL = "WORDS", "INITIAL_HIDDEN", "INITIAL_CELL"
OUTPUTS, LENGTHS, HIDDEN, CELL = "OUTPUTS", "LENGTHS", "HIDDEN", "CELL"
NAME_SHOWN_CHARS = 64
"""How much of an unknown tensor name a message repeats."""

_LENGTH = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a model's signature: name, datatype and shape (-1 where it varies)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def input_specs(model: ModelRuntime) -> list[TensorSpec]:
    """The model's input tensors, as ModelMetadata reports them (WORDS [-1, 1]: one string per batch item)."""
    state = (-1, model.manifest.num_layers, model.manifest.hidden_size)
    specs = [TensorSpec(WORDS, "BYTES", (-1, 1)), TensorSpec(INITIAL_HIDDEN, "FP32", state)]
    if model.manifest.has_cell_state:
        specs.append(TensorSpec(INITIAL_CELL, "FP32", state))
    return specs


def output_specs(model: ModelRuntime) -> list[TensorSpec]:
    """The model's output tensors, as ModelMetadata reports them and ModelInfer returns them."""
    state = (-1, model.manifest.num_layers, model.manifest.hidden_size)
    specs = [
        TensorSpec(OUTPUTS, "FP32", (-1, -1, model.manifest.hidden_size)),
        TensorSpec(LENGTHS, "INT32", (-1,)),
        TensorSpec(HIDDEN, "FP32", state),
    ]
    if model.manifest.has_cell_state:
        specs.append(TensorSpec(CELL, "FP32", state))
    return specs


@dataclass(frozen=True, slots=True)
class InferInputs:
    """A ModelInferRequest read into core types."""

    words: list[str]
    states: list[InitialState]
    outputs: list[str]
    """The output tensors to send back, in the order they are sent."""


def decode_request(request: pb.ModelInferRequest, model: ModelRuntime) -> InferInputs:
    """Words, initial states and requested outputs of a request; InvalidRequestError naming what is wrong."""
    known = {spec.name for spec in input_specs(model)}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _invalid(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: give one per input or none"
        )
    tensors: dict[str, tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in known:
            raise _invalid(
                f"unknown input {_shown(tensor.name)} for model {model.name!r} (inputs: {', '.join(sorted(known))})"
            )
        if tensor.name in tensors:
            raise _invalid(f"input {tensor.name} is given twice")
        tensors[tensor.name] = (tensor, raw[index] if raw else None)
    if WORDS not in tensors:
        raise _invalid(f"the request has no {WORDS} input (BYTES, one string per word)", Reason.NO_WORDS)
    words = _words(*tensors[WORDS])
    shape = (len(words), model.manifest.num_layers, model.manifest.hidden_size)
    hidden = _state(*tensors[INITIAL_HIDDEN], shape) if INITIAL_HIDDEN in tensors else None
    cell = _state(*tensors[INITIAL_CELL], shape) if INITIAL_CELL in tensors else None
    states: list[InitialState] = []
    if hidden is not None or cell is not None:
        hidden = np.zeros(shape, dtype=np.float32) if hidden is None else hidden
        states = [InitialState(hidden[row], None if cell is None else cell[row]) for row in range(len(words))]
    return InferInputs(words, states, _requested(request, model))


def _requested(request: pb.ModelInferRequest, model: ModelRuntime) -> list[str]:
    available = [spec.name for spec in output_specs(model)]
    if not request.outputs:
        return available
    names: list[str] = []
    for output in request.outputs:
        if output.name not in available:
            raise _invalid(
                f"unknown output {_shown(output.name)} for model {model.name!r} (outputs: {', '.join(available)})"
            )
        if "classification" in output.parameters:
            raise _invalid(f"output {output.name}: classification is not supported")
        if output.name not in names:
            names.append(output.name)
    return names


def _words(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[str]:
    if tensor.datatype != "BYTES":
        raise _invalid(f"input {WORDS} has datatype {_shown(tensor.datatype)}; expected BYTES")
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 0:
        raise _invalid(f"input {WORDS} has shape {shape}; expected [words] or [words, 1]")
    count = shape[0]
    if raw is None:
        elements: Sequence[bytes] = tensor.contents.bytes_contents
    else:
        elements = _split_bytes(raw, count)
    if len(elements) != count:
        raise _invalid(f"input {WORDS} has shape {shape} but holds {len(elements)} strings")
    try:
        return [element.decode("utf-8") for element in elements]
    except UnicodeDecodeError as error:
        index = next(i for i, element in enumerate(elements) if not _is_utf8(element))
        raise InvalidRequestError(
            f"input {WORDS}: word {index} is not valid UTF-8 ({error.reason} at byte {error.start})",
            Reason.INVALID_REQUEST, {"word_index": str(index)},
        ) from None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _split_bytes(raw: bytes, count: int) -> list[bytes]:
    """BYTES elements of a raw tensor: each a 4-byte little-endian length and then that many bytes."""
    elements: list[bytes] = []
    view = memoryview(raw)
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise _invalid(f"input {WORDS}: raw contents end inside the length of element {len(elements)}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise _invalid(
                f"input {WORDS}: element {len(elements)} says {length} bytes, but only {len(raw) - offset} are left"
            )
        elements.append(bytes(view[offset:offset + length]))
        offset += length
        if len(elements) > count:
            break
    return elements


def _state(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, shape: tuple[int, int, int]
) -> npt.NDArray[np.float32]:
    if tensor.datatype != "FP32":
        raise _invalid(f"input {tensor.name} has datatype {_shown(tensor.datatype)}; expected FP32",
                       Reason.INVALID_STATE)
    if tuple(tensor.shape) != shape:
        raise _invalid(
            f"input {tensor.name} has shape {list(tensor.shape)}; expected [words, num_layers, hidden] = {list(shape)}",
            Reason.INVALID_STATE,
        )
    if raw is None:
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
    elif len(raw) % 4:
        raise _invalid(f"input {tensor.name}: raw contents of {len(raw)} bytes are not FP32 values",
                       Reason.INVALID_STATE)
    else:
        values = np.frombuffer(raw, dtype="<f4")
    if values.size != shape[0] * shape[1] * shape[2]:
        raise _invalid(
            f"input {tensor.name} has shape {list(shape)} but holds {values.size} values", Reason.INVALID_STATE
        )
    return values.astype(np.float32, copy=False).reshape(shape)


def encode_response(request: pb.ModelInferRequest, rows: RequestRows, outputs: Sequence[str]) -> pb.ModelInferResponse:
    """The response: the requested output tensors, in order, each in raw_output_contents."""
    run = rows.outputs
    assert run is not None, "a ModelInfer request fails on any bad word, so every row has results"
    response = pb.ModelInferResponse(model_name=rows.model.name, model_version=str(rows.model.version), id=request.id)
    for name in outputs:
        if name == OUTPUTS:
            array: npt.NDArray[np.generic] = run.outputs
        elif name == LENGTHS:
            array = rows.lengths
        elif name == HIDDEN:
            array = run.h_n.transpose(1, 0, 2)
        else:
            assert run.c_n is not None
            array = run.c_n.transpose(1, 0, 2)
        datatype = "INT32" if name == LENGTHS else "FP32"
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype="<i4" if name == LENGTHS else "<f4").tobytes())
    return response


def _shown(name: str) -> str:
    return repr(name) if len(name) <= NAME_SHOWN_CHARS else f"{name[:NAME_SHOWN_CHARS]!r}... ({len(name)} characters)"


def _invalid(message: str, reason: Reason = Reason.INVALID_REQUEST) -> InvalidRequestError:
    return InvalidRequestError(message, reason)
