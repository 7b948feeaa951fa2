"""The charrnn.v1 wire codec: EncodeResponse bytes written by hand, and State messages read as arrays.

Responses are the hot path: a 1024-word response holds thousands of floats, and building it field by field
(a WordResult per word, each float converted to a Python object and back) cost more than the model run.
encode_response() instead writes the EncodeResponse wire format in one pass: per word a few header bytes and
memoryview slices of the run's arrays, joined once. Those bytes are what gRPC sends (charrnn_v1 registers
Encode and EncodeStream with a pass-through serialiser).

Every tag is computed from the generated descriptor (a renamed or renumbered field cannot go stale here), and
reference_response() builds the same message with protobuf's own API: tests/test_codec.py checks that the two
agree byte for byte, and that every field the descriptor has is written, so a field added to the .proto but
not to this codec fails the tests instead of silently never being sent.

EncodeRequest.fields (ResultFields) leaves arrays out: both paths and reference_response() take the same
selection, and the tests compare them under every selection.
"""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from proto.charrnn.v1 import charrnn_pb2 as pb
from server.core.engine import InitialState, RequestRows, WordEncoding
from server.core.errors import InvalidWordError


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = tuple(_varint(value) for value in range(1024))


def _len_prefix(value: int) -> bytes:
    return _SMALL_VARINTS[value] if value < 1024 else _varint(value)


def _string_field(tag: bytes, text: str) -> bytes:
    """A proto3 string field, omitted when empty (as protobuf itself does)."""
    data = text.encode("utf-8")
    return tag + _len_prefix(len(data)) + data if data else b""


_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_SCALAR_WIRE_TYPES = {
    FieldDescriptor.TYPE_UINT32: _VARINT, FieldDescriptor.TYPE_DOUBLE: _FIXED64, FieldDescriptor.TYPE_FLOAT: _FIXED32,
}


def field_tag(message: Descriptor, name: str) -> bytes:
    """The wire tag (field number << 3 | wire type) of a field, from the generated descriptor."""
    field = message.fields_by_name[name]
    if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE) or field.is_repeated:
        wire_type = _LENGTH_DELIMITED  # proto3 packs repeated scalars
    else:
        wire_type = _SCALAR_WIRE_TYPES[field.type]
    return _varint(field.number << 3 | wire_type)


_RESPONSE, _WORD_RESULT, _TIMING_MESSAGE, _STATE = (
    pb.EncodeResponse.DESCRIPTOR, pb.WordResult.DESCRIPTOR, pb.Timing.DESCRIPTOR, pb.State.DESCRIPTOR
)
_MODEL, _HIDDEN_SIZE, _NUM_LAYERS, _RESULT, _TIMING_FIELD, _VERSION = (
    field_tag(_RESPONSE, name) for name in ("model", "hidden_size", "num_layers", "results", "timing", "version")
)
_WORD, _LENGTH, _OUTPUTS, _HIDDEN, _CELL, _ERROR = (
    field_tag(_WORD_RESULT, name) for name in ("word", "length", "outputs", "hidden", "cell", "error")
)
_QUEUE_MS, _INFERENCE_MS, _TOTAL_MS = (field_tag(_TIMING_MESSAGE, name) for name in ("queue_ms", "inference_ms", "total_ms"))
_STATE_HIDDEN, _STATE_CELL = field_tag(_STATE, "hidden"), field_tag(_STATE, "cell")


@dataclass(frozen=True, slots=True)
class ResultFields:
    """Which arrays each WordResult carries (EncodeRequest.fields); `word`, `length` and `error` always."""

    outputs: bool = True
    hidden: bool = True
    cell: bool = True


ALL_FIELDS = ResultFields()
"""The default: every array, as before EncodeRequest.fields existed."""


@functools.lru_cache(maxsize=64)
def _selected(values: tuple[int, ...]) -> ResultFields:
    chosen = set(values)
    return ResultFields(
        pb.RESULT_FIELD_OUTPUTS in chosen, pb.RESULT_FIELD_HIDDEN in chosen, pb.RESULT_FIELD_CELL in chosen
    )


def result_fields(values: Sequence[int]) -> ResultFields:
    """EncodeRequest.fields as a ResultFields: empty means all; otherwise exactly the fields named
    (RESULT_FIELD_UNSPECIFIED and values unknown to this server select nothing)."""
    return ALL_FIELDS if not values else _selected(tuple(values))


def initial_state(state: pb.State) -> InitialState:
    """A State message as arrays, read straight from its (packed) wire bytes rather than float by float."""
    data = state.SerializeToString()  # upb writes repeated floats packed: [tag, length, float32 LE...] per field
    arrays: dict[int, npt.NDArray[np.float32]] = {}
    position = 0
    while position < len(data):
        tag = data[position : position + 1]
        length, position = _read_varint(data, position + 1)
        if tag not in (_STATE_HIDDEN, _STATE_CELL) or length % 4 or position + length > len(data):
            break  # not the layout expected: fall back to the message API
        arrays[tag] = np.frombuffer(data, dtype="<f4", count=length // 4, offset=position).astype(np.float32)
        position += length
    else:
        cell = arrays.get(_STATE_CELL)
        hidden = arrays.get(_STATE_HIDDEN, np.zeros(0, dtype=np.float32))
        return InitialState(hidden, cell if cell is not None and cell.size else None)
    return InitialState(
        np.asarray(state.hidden, dtype=np.float32),
        np.asarray(state.cell, dtype=np.float32) if len(state.cell) else None,
    )


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def encode_response(rows: RequestRows, started: float, fields: ResultFields = ALL_FIELDS) -> bytes:
    """The EncodeResponse for a request, serialised by hand in one pass (see module doc), carrying the arrays
    `fields` selects; `started` is the time.perf_counter() at receipt, for timing.total_ms."""
    manifest = rows.model.manifest
    header = _header(manifest.name, manifest.hidden_size, manifest.num_layers)
    queue_ms = inference_ms = 0.0
    if rows.stats is not None:
        queue_ms, inference_ms = rows.stats.queue_s * 1000.0, rows.stats.inference_s * 1000.0
    data = _serialise_vectorised(rows, header, fields)
    if data is None:
        parts: list[bytes | memoryview] = [header]
        _append_results(rows, parts, fields)
        data = b"".join(parts)
    total_ms = (time.perf_counter() - started) * 1000.0
    # The version (field 6) goes before timing (5): where protobuf itself writes it once timing is cleared
    # (tests/test_codec.py compares the bytes that way); parsers accept fields in any order.
    return b"".join((
        data, _version_field(rows.model.version),
        _TIMING.pack(_TIMING_HEAD, queue_ms, _INF_TAG, inference_ms, _TOTAL_TAG, total_ms),
    ))


@functools.lru_cache(maxsize=256)
def _version_field(version: int) -> bytes:
    """EncodeResponse.version, omitted when 0 (as protobuf does)."""
    return _VERSION + _varint(version) if version else b""


def reference_response(rows: RequestRows, total_ms: float, fields: ResultFields = ALL_FIELDS) -> pb.EncodeResponse:
    """The message encode_response() writes, built field by field with protobuf's API: slow, obviously right."""
    manifest = rows.model.manifest
    response = pb.EncodeResponse(
        model=manifest.name, hidden_size=manifest.hidden_size, num_layers=manifest.num_layers,
        version=rows.model.version,
    )
    for item in rows.word_encodings():
        if isinstance(item, WordEncoding):
            response.results.add(
                word=item.word,
                length=len(item.outputs),
                outputs=item.outputs.ravel().tolist() if fields.outputs else (),
                hidden=item.hidden.ravel().tolist() if fields.hidden else (),
                cell=item.cell.ravel().tolist() if item.cell is not None and fields.cell else (),
            )
        else:
            assert isinstance(item, InvalidWordError)
            response.results.add(word=item.word, length=len(item.word), error=str(item))
    stats = rows.stats
    response.timing.queue_ms = stats.queue_s * 1000.0 if stats is not None else 0.0
    response.timing.inference_ms = stats.inference_s * 1000.0 if stats is not None else 0.0
    response.timing.total_ms = total_ms
    return response


@functools.lru_cache(maxsize=256)
def _header(model: str, hidden_size: int, num_layers: int) -> bytes:
    """EncodeResponse fields 1-3, the same for every response of a model: written once per model."""
    return (
        _string_field(_MODEL, model)
        + (_HIDDEN_SIZE + _varint(hidden_size) if hidden_size else b"")
        + (_NUM_LAYERS + _varint(num_layers) if num_layers else b"")
    )


# Timing: three doubles (8 bytes and a 1-byte tag each: 27 bytes), written even when zero (parsers accept that).
_TIMING = struct.Struct("<3sdBdBd")
_TIMING_HEAD = _TIMING_FIELD + _varint(27) + _QUEUE_MS
_INF_TAG, _TOTAL_TAG = _INFERENCE_MS[0], _TOTAL_MS[0]
assert len(_TIMING_HEAD) == 3 and len(_INFERENCE_MS) == len(_TOTAL_MS) == 1, "Timing's layout changed: see _TIMING"


VECTORISE_WORDS_PER_GROUP = 20
"""Vectorise when there are at least this many words per distinct word length (measured crossover ~16)."""


def _serialise_vectorised(rows: RequestRows, header: bytes, fields: ResultFields) -> bytes | memoryview | None:
    """header + every word's WordResult, built with numpy a group at a time, where that pays; else None.

    Handles the common case: every word good and ASCII (byte length = letters). Words of the same length
    have records of the same layout (_RecordLayout, made once per length and selection): each length group is
    one 2-D byte block, its constant bytes broadcast from the layout's template row and the variable column
    ranges (word bytes, the float32 arrays viewed as bytes) filled in; the rows are then joined in request
    order. With a single group the block is written straight into the final buffer after the header (no join,
    one copy less of a possibly large response). Each group costs several numpy calls, so this is used only
    with enough words per group; small requests, bad words reported and non-ASCII words take the loop
    (_append_results).
    """
    outputs_array = rows.outputs
    words = rows.words
    if outputs_array is None or rows.problems is not None or len(words) < VECTORISE_WORDS_PER_GROUP:
        return None
    lengths = rows.lengths
    # Every word is good here, so the words' own lengths are the rows' (a set in Python: numpy's == / all /
    # unique cost 5-8 us more on a cold request).
    unique = sorted(set(map(len, words)))
    single = len(unique) == 1
    if len(words) < VECTORISE_WORDS_PER_GROUP * len(unique):
        return None
    joined = "".join(words)
    if not joined.isascii():
        return None
    letters = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    outputs, h_n, c_n = outputs_array.outputs, outputs_array.h_n, outputs_array.c_n
    hidden_size = outputs.shape[2]
    state_bytes = h_n.shape[0] * h_n.shape[2] * 4
    final: npt.NDArray[np.uint8] | None = None
    rows_of_group: list[npt.NDArray[np.intp]] = []
    blocks: list[npt.NDArray[np.uint8]] = []
    for length in unique:
        layout = _record_layout(length, hidden_size, state_bytes, fields, c_n is not None)
        if single:
            count = len(words)
            group: npt.NDArray[np.intp] = np.arange(count)
            pick: slice | npt.NDArray[np.intp] = slice(None)
            word_letters = letters.reshape(count, length)
            final = np.empty(len(header) + count * layout.width, dtype=np.uint8)
            final[: len(header)] = np.frombuffer(header, dtype=np.uint8)
            block = final[len(header) :].reshape(count, layout.width)
        else:
            wide = lengths.astype(np.int64)
            group = pick = np.flatnonzero(wide == length)
            count = len(group)
            word_letters = letters[(np.cumsum(wide) - wide)[group, None] + np.arange(length)]
            block = np.empty((count, layout.width), dtype=np.uint8)
        block[:] = layout.template
        block[:, layout.letters : layout.letters + length] = word_letters
        if layout.outputs is not None:
            block[:, layout.outputs : layout.outputs + length * hidden_size * 4] = _as_bytes(outputs[pick, :length], count)
        if layout.hidden is not None:
            block[:, layout.hidden : layout.hidden + state_bytes] = _as_bytes(h_n[:, pick].transpose(1, 0, 2), count)
        if layout.cell is not None and c_n is not None:
            block[:, layout.cell : layout.cell + state_bytes] = _as_bytes(c_n[:, pick].transpose(1, 0, 2), count)
        rows_of_group.append(group)
        blocks.append(block)
    if final is not None:
        return memoryview(final)
    records: list[bytes | memoryview] = [b""] * len(words)
    for group, block in zip(rows_of_group, blocks, strict=True):
        view, width = memoryview(block.reshape(-1)), block.shape[1]
        for index, row in enumerate(group.tolist()):
            records[row] = view[index * width : (index + 1) * width]
    return b"".join([header, *records])


@dataclass(frozen=True, slots=True)
class _RecordLayout:
    """The wire layout of one good ASCII word's WordResult of a given length: a template row holding every
    constant byte (tags, lengths) and the offsets of the variable ranges (None: not sent)."""

    template: npt.NDArray[np.uint8]
    width: int
    letters: int
    outputs: int | None
    hidden: int | None
    cell: int | None


@functools.lru_cache(maxsize=1024)
def _record_layout(length: int, hidden_size: int, state_bytes: int, fields: ResultFields, has_cell: bool) -> _RecordLayout:
    floats = length * hidden_size * 4 if fields.outputs else 0
    pieces: list[bytes | int] = [  # bytes: constant; int: a variable range of that many bytes
        _WORD + _len_prefix(length), length,  # ASCII: the word's byte length is its length
        _LENGTH + _len_prefix(length) + (_OUTPUTS + _len_prefix(floats) if floats else b""),
    ]
    if floats:
        pieces.append(floats)
    if state_bytes and fields.hidden:
        pieces += [_HIDDEN + _len_prefix(state_bytes), state_bytes]
    if state_bytes and has_cell and fields.cell:
        pieces += [_CELL + _len_prefix(state_bytes), state_bytes]
    body = sum(len(piece) if isinstance(piece, bytes) else piece for piece in pieces)
    pieces.insert(0, _RESULT + _len_prefix(body))
    template = bytearray()
    offsets: list[int] = []
    for piece in pieces:
        if isinstance(piece, bytes):
            template += piece
        else:
            offsets.append(len(template))
            template += bytes(piece)
    variable = iter(offsets[1:])
    return _RecordLayout(
        np.frombuffer(bytes(template), dtype=np.uint8), len(template), offsets[0],
        next(variable) if floats else None,
        next(variable) if state_bytes and fields.hidden else None,
        next(variable) if state_bytes and has_cell and fields.cell else None,
    )


def _as_bytes(array: npt.NDArray[np.float32], rows: int) -> npt.NDArray[np.uint8]:
    """[rows, ...] float32 as [rows, bytes] little-endian float32 bytes (copied only if needed)."""
    return np.ascontiguousarray(array, dtype="<f4").reshape(rows, -1).view(np.uint8)


def _append_results(rows: RequestRows, parts: list[bytes | memoryview], fields: ResultFields) -> None:
    """Append every word's WordResult (field 4 of EncodeResponse), in request order, as pieces to join:
    headers as bytes, floats as memoryview slices of the little-endian float32, C-contiguous batch arrays;
    only the arrays `fields` selects."""
    append = parts.append
    problems = rows.problems
    good = iter(())
    if rows.outputs is not None:
        outputs = np.ascontiguousarray(rows.outputs.outputs, dtype="<f4")  # [words, max_len, hidden]
        hidden = np.ascontiguousarray(rows.outputs.h_n.transpose(1, 0, 2), dtype="<f4")  # [words, layers, hidden]
        c_n = rows.outputs.c_n
        cell = None if c_n is None else np.ascontiguousarray(c_n.transpose(1, 0, 2), dtype="<f4")
        row_bytes = outputs.shape[1] * outputs.shape[2] * 4
        step_bytes = outputs.shape[2] * 4 if fields.outputs else 0
        state_bytes = hidden.shape[1] * hidden.shape[2] * 4
        out_view = memoryview(outputs.reshape(-1)).cast("B")
        hidden_view = memoryview(hidden.reshape(-1)).cast("B")
        cell_view = (
            None if cell is None or not state_bytes or not fields.cell else memoryview(cell.reshape(-1)).cast("B")
        )
        hidden_head = _HIDDEN + _len_prefix(state_bytes) if state_bytes and fields.hidden else b""
        cell_head = _CELL + _len_prefix(state_bytes) if cell_view is not None else b""
        tail = (len(hidden_head) + state_bytes if hidden_head else 0) + (
            len(cell_head) + state_bytes if cell_head else 0
        )
        good = iter(rows.lengths.tolist())
        row = 0
    for index, word in enumerate(rows.words):
        problem = problems[index] if problems is not None else None
        if problem is not None:
            record = (
                _string_field(_WORD, problem.word)
                + (_LENGTH + _varint(len(problem.word)) if problem.word else b"")
                + _string_field(_ERROR, str(problem))
            )
            append(_RESULT + _len_prefix(len(record)))
            append(record)
            continue
        length: int = next(good)
        data = word.encode("utf-8")
        floats = length * step_bytes
        head = (
            (_WORD + _len_prefix(len(data)) + data if data else b"")
            + (_LENGTH + _len_prefix(length) if length else b"")
            + (_OUTPUTS + _len_prefix(floats) if floats else b"")
        )
        append(_RESULT + _len_prefix(len(head) + floats + tail) + head)
        if floats:
            start = row * row_bytes
            append(out_view[start : start + floats])
        state = row * state_bytes
        if hidden_head:
            append(hidden_head)
            append(hidden_view[state : state + state_bytes])
        if cell_view is not None:
            append(cell_head)
            append(cell_view[state : state + state_bytes])
        row += 1
