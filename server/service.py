"""The charrnn.v1 gRPC service: the only module that touches protobuf messages.

Responses are the hot path: a 1024-word response holds thousands of floats, and building it field by
field (a WordResult per word, each float converted to a Python object and back) cost more than the model
run. _response() instead writes the EncodeResponse wire format in one pass: per word a few header bytes
and memoryview slices of the batch arrays, joined once. Those bytes are what gRPC sends: Encode and
EncodeStream are registered (add_to_server) with a response serialiser that passes bytes through, so the
response is never parsed into a message and serialised again. The bytes parse to exactly the message built
field by field (tests/test_batcher.py checks this).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from server.engine import BatchResult, Engine, InitialState
from server.errors import ModelsLoadingError, ServiceError
from server.metrics import Metrics
from server.runtime import ModelRuntime

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CharRnn"].full_name

STREAM_PIPELINE_DEPTH = 4
"""Stream messages a stream may have in flight at once; beyond that the server stops reading (flow control)."""

Response = TypeVar("Response")


def _abort_code(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ServiceError):
        return error.code, error.message
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


class CharRnnService(pb_grpc.CharRnnServicer):
    """Translates charrnn.v1 messages to Engine calls and back."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._engine: Engine | None = None
        # Metric children by label values: labels() is a locked dict lookup per call, these are plain lookups.
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._model_children: dict[str, tuple[Any, Any]] = {}

    def attach(self, engine: Engine) -> None:
        """Start answering with this engine (until then RPCs get UNAVAILABLE: models are loading)."""
        self._engine = engine

    @property
    def engine(self) -> Engine:
        """The engine, or ModelsLoadingError while the server starts."""
        if self._engine is None:
            raise ModelsLoadingError("the server is still loading its models; retry shortly")
        return self._engine

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> bytes:
        """Unary encode; bad words fail the request unless the request asks for REPORT. Returns the wire bytes."""
        return await self._observed(
            "Encode", request.model, context, lambda: self._encode(request, default_report=False)
        )

    async def EncodeStream(
        self, request_iterator: AsyncIterator[pb.EncodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """One response per request message, in order, with up to STREAM_PIPELINE_DEPTH messages in flight."""
        pending: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue(STREAM_PIPELINE_DEPTH)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(self._stream_message(request)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                try:
                    yield await task
                except ServiceError as error:
                    await context.abort(error.code, error.message)
                except grpc.aio.AbortError:
                    raise
                except Exception:
                    logger.exception("EncodeStream failed")
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
            await reader  # surface a failure of the request stream itself
        finally:
            reader.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if leftover is not None:
                    leftover.cancel()

    async def _stream_message(self, request: pb.EncodeRequest) -> bytes:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await self._encode(request, default_report=True)
        except BaseException as error:
            code = _abort_code(error)[0]
            raise
        finally:
            self._record("EncodeStream", request.model, code, started)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        """Metadata of every loaded model, sorted by name."""
        return await self._observed(
            "ListModels", "", context,
            _as_async(lambda: pb.ListModelsResponse(models=[self._metadata(m) for _, m in sorted(self.engine.models.items())])),
        )

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadata:
        """One model's metadata."""
        return await self._observed(
            "GetModel", request.name, context, _as_async(lambda: self._metadata(self.engine.model(request.name)))
        )

    async def _observed(
        self,
        method: str,
        model: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[], Awaitable[Response]],
    ) -> Response:
        """Run a handler, count it, time it, and turn errors into statuses (tracebacks go to the log only)."""
        started = time.perf_counter()
        try:
            response = await handler()
        except ServiceError as error:
            logger.debug("%s %s: %s %s", method, model, error.code.name, error.message)
            # Counted before the status leaves: a client reading /metrics right after sees its call.
            self._record(method, model, error.code, started)
            await context.abort(error.code, error.message)
        except asyncio.CancelledError:
            # grpc.aio cancels the handler both when the client cancels and when its deadline passes.
            expired = context.time_remaining() is not None and context.time_remaining() <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self._record(method, model, code, started)
            raise
        except Exception:
            logger.exception("%s %s failed", method, model)
            self._record(method, model, grpc.StatusCode.INTERNAL, started)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        else:
            self._record(method, model, grpc.StatusCode.OK, started)
            return response
        raise AssertionError("unreachable: context.abort raises")

    def _record(self, method: str, model: str, code: grpc.StatusCode, started: float) -> None:
        # Unknown names would grow the label set without bound.
        label = model if self._engine is not None and model in self._engine.models else ""
        key = (method, label, code.name)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.metrics.requests.labels(method, label, code.name),
                self.metrics.request_seconds.labels(method, label),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def _per_model(self, model: str) -> tuple[Any, Any]:
        """(words_per_request, queue_seconds) metric children of a loaded model."""
        children = self._model_children.get(model)
        if children is None:
            children = self._model_children[model] = (
                self.metrics.words_per_request.labels(model),
                self.metrics.queue_seconds.labels(model),
            )
        return children

    async def _encode(self, request: pb.EncodeRequest, default_report: bool) -> bytes:
        started = time.perf_counter()
        if request.invalid_words == pb.INVALID_WORD_POLICY_UNSPECIFIED:
            report = default_report
        else:
            report = request.invalid_words == pb.INVALID_WORD_POLICY_REPORT
        states = [_initial_state(state) for state in request.initial_states]
        result = await self.engine.encode_batch(request.model, list(request.words), states, report_invalid=report)
        words_per_request, queue_seconds = self._per_model(result.model.name)
        words_per_request.observe(len(request.words))
        return _response(result, started, queue_seconds)

    def _metadata(self, model: ModelRuntime) -> pb.ModelMetadata:
        manifest = model.manifest
        return pb.ModelMetadata(
            name=manifest.name,
            kind=manifest.kind,
            input_size=manifest.input_size,
            hidden_size=manifest.hidden_size,
            num_layers=manifest.num_layers,
            nonlinearity=manifest.nonlinearity or "",
            alphabet=manifest.alphabet,
            artifact_sha256=manifest.artifacts,
            execution_provider=model.provider,
            max_word_length=self.engine.limits.max_word_length,
        )


def add_to_server(service: CharRnnService, server: grpc.aio.Server) -> None:
    """Register the service like the generated add_CharRnnServicer_to_server, except that Encode and
    EncodeStream responses are the wire bytes _response() wrote (see module doc)."""
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def method_handlers(service: CharRnnService) -> dict[str, grpc.RpcMethodHandler]:
    """Every charrnn.v1.CharRnn method's handler, by method name."""
    return {
        "Encode": grpc.unary_unary_rpc_method_handler(
            service.Encode, request_deserializer=pb.EncodeRequest.FromString, response_serializer=_wire_bytes
        ),
        "EncodeStream": grpc.stream_stream_rpc_method_handler(
            service.EncodeStream, request_deserializer=pb.EncodeRequest.FromString, response_serializer=_wire_bytes
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels,
            request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
        "GetModel": grpc.unary_unary_rpc_method_handler(
            service.GetModel,
            request_deserializer=pb.GetModelRequest.FromString,
            response_serializer=pb.ModelMetadata.SerializeToString,
        ),
    }


def _wire_bytes(response: bytes) -> bytes:
    return response


def _as_async(function: Callable[[], Response]) -> Callable[[], Awaitable[Response]]:
    @functools.wraps(function)
    async def call() -> Response:
        return function()

    return call


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


# Wire tags (field number << 3 | wire type): 0 varint, 1 64-bit, 2 length-delimited.
_MODEL, _HIDDEN_SIZE, _NUM_LAYERS, _RESULT = b"\x0a", b"\x10", b"\x18", b"\x22"
_WORD, _LENGTH, _OUTPUTS, _HIDDEN, _CELL, _ERROR = b"\x0a", b"\x10", b"\x1a", b"\x22", b"\x2a", b"\x32"


def _initial_state(state: pb.State) -> InitialState:
    """A State message as arrays, read straight from its (packed) wire bytes rather than float by float."""
    data = state.SerializeToString()  # upb writes repeated floats packed: [tag, length, float32 LE...] per field
    arrays: dict[int, npt.NDArray[np.float32]] = {}
    position = 0
    while position < len(data):
        tag = data[position]
        length, position = _read_varint(data, position + 1)
        if tag not in (0x0A, 0x12) or length % 4 or position + length > len(data):
            break  # not the layout expected: fall back to the message API
        arrays[tag >> 3] = np.frombuffer(data, dtype="<f4", count=length // 4, offset=position).astype(np.float32)
        position += length
    else:
        cell = arrays.get(2)
        return InitialState(arrays.get(1, np.zeros(0, dtype=np.float32)), cell if cell is not None and cell.size else None)
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


def _response(result: BatchResult, started: float, queue_seconds: Any) -> bytes:
    """The EncodeResponse for a request, serialised by hand in one pass (see module doc)."""
    manifest = result.model.manifest
    header = _header(manifest.name, manifest.hidden_size, manifest.num_layers)
    queue_ms = inference_ms = 0.0
    if result.stats is not None:
        queue_seconds.observe(result.stats.queue_s)
        queue_ms, inference_ms = result.stats.queue_s * 1000.0, result.stats.inference_s * 1000.0
    data = _serialise_vectorised(result, header)
    if data is None:
        parts: list[bytes | memoryview] = [header]
        _append_results(result, parts)
        data = b"".join(parts)
    total_ms = (time.perf_counter() - started) * 1000.0
    return b"".join((data, _TIMING.pack(_TIMING_HEAD, queue_ms, _INFERENCE, inference_ms, _TOTAL, total_ms)))


@functools.lru_cache(maxsize=256)
def _header(model: str, hidden_size: int, num_layers: int) -> bytes:
    """EncodeResponse fields 1-3, the same for every response of a model: written once per model."""
    return (
        _string_field(_MODEL, model)
        + (_HIDDEN_SIZE + _varint(hidden_size) if hidden_size else b"")
        + (_NUM_LAYERS + _varint(num_layers) if num_layers else b"")
    )


# Timing (field 5 of EncodeResponse): three doubles, written even when zero (parsers accept that).
_TIMING = struct.Struct("<3sdBdBd")
_TIMING_HEAD, _INFERENCE, _TOTAL = b"\x2a\x1b\x09", 0x11, 0x19


VECTORISE_WORDS_PER_GROUP = 20
"""Vectorise when there are at least this many words per distinct word length (measured crossover ~16)."""


def _serialise_vectorised(result: BatchResult, header: bytes) -> bytes | memoryview | None:
    """header + every word's WordResult, built with numpy a group at a time, where that pays; else None.

    Handles the common case: every word good and ASCII (byte length = letters). Words of the same length
    have records of the same layout, so each length group is one 2-D byte block filled column range by
    column range (constant headers broadcast, word bytes, the float32 arrays viewed as bytes); the rows
    are then joined in request order. With a single group the block is written straight into the final
    buffer after the header (no join, one copy less of a possibly large response). Each group costs a
    dozen numpy calls, so this is used only with enough words per group; small requests, bad words
    reported and non-ASCII words take the loop (_append_results).
    """
    outputs_array = result.outputs
    words = result.words
    if outputs_array is None or result.problems is not None or len(words) < VECTORISE_WORDS_PER_GROUP:
        return None
    lengths = result.lengths.astype(np.int64)
    unique = np.unique(lengths)
    if len(words) < VECTORISE_WORDS_PER_GROUP * len(unique):
        return None
    joined = "".join(words)
    if not joined.isascii():
        return None
    letters = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    outputs, h_n, c_n = outputs_array.outputs, outputs_array.h_n, outputs_array.c_n
    hidden_size = outputs.shape[2]
    state_bytes = h_n.shape[0] * h_n.shape[2] * 4
    single = len(unique) == 1
    final: npt.NDArray[np.uint8] | None = None
    rows_of_group: list[npt.NDArray[np.intp]] = []
    blocks: list[npt.NDArray[np.uint8]] = []
    for length in unique.tolist():
        rows = np.arange(len(words)) if single else np.flatnonzero(lengths == length)
        pick: slice | npt.NDArray[np.intp] = slice(None) if single else rows
        count = len(rows)
        floats = length * hidden_size * 4
        word_letters = (
            letters.reshape(count, length) if single
            else letters[(np.cumsum(lengths) - lengths)[rows, None] + np.arange(length)]
        )
        columns: list[bytes | npt.NDArray[np.uint8]] = [
            _WORD + _len_prefix(length),  # ASCII: the word's byte length is its length
            word_letters,
            _LENGTH + _len_prefix(length) + (_OUTPUTS + _len_prefix(floats) if floats else b""),
            _as_bytes(outputs[pick, :length], count),
        ]
        if state_bytes:
            columns += [_HIDDEN + _len_prefix(state_bytes), _as_bytes(h_n[:, pick].transpose(1, 0, 2), count)]
            if c_n is not None:
                columns += [_CELL + _len_prefix(state_bytes), _as_bytes(c_n[:, pick].transpose(1, 0, 2), count)]
        body = sum(len(column) if isinstance(column, bytes) else column.shape[1] for column in columns)
        columns.insert(0, _RESULT + _len_prefix(body))
        width = body + len(columns[0])
        if single:
            final = np.empty(len(header) + count * width, dtype=np.uint8)
            final[: len(header)] = np.frombuffer(header, dtype=np.uint8)
            block = final[len(header) :].reshape(count, width)
        else:
            block = np.empty((count, width), dtype=np.uint8)
        offset = 0
        for column in columns:
            span = len(column) if isinstance(column, bytes) else column.shape[1]
            block[:, offset : offset + span] = (
                np.frombuffer(column, dtype=np.uint8) if isinstance(column, bytes) else column
            )
            offset += span
        rows_of_group.append(rows)
        blocks.append(block)
    if final is not None:
        return memoryview(final)
    records: list[bytes | memoryview] = [b""] * len(words)
    for rows, block in zip(rows_of_group, blocks, strict=True):
        view, width = memoryview(block.reshape(-1)), block.shape[1]
        for index, row in enumerate(rows.tolist()):
            records[row] = view[index * width : (index + 1) * width]
    return b"".join([header, *records])


def _as_bytes(array: npt.NDArray[np.float32], rows: int) -> npt.NDArray[np.uint8]:
    """[rows, ...] float32 as [rows, bytes] little-endian float32 bytes (copied only if needed)."""
    return np.ascontiguousarray(array, dtype="<f4").reshape(rows, -1).view(np.uint8)


def _append_results(result: BatchResult, parts: list[bytes | memoryview]) -> None:
    """Append every word's WordResult (field 4 of EncodeResponse), in request order, as pieces to join:
    headers as bytes, floats as memoryview slices of the little-endian float32, C-contiguous batch arrays."""
    append = parts.append
    problems = result.problems
    good = iter(())
    if result.outputs is not None:
        outputs = np.ascontiguousarray(result.outputs.outputs, dtype="<f4")  # [words, max_len, hidden]
        hidden = np.ascontiguousarray(result.outputs.h_n.transpose(1, 0, 2), dtype="<f4")  # [words, layers, hidden]
        c_n = result.outputs.c_n
        cell = None if c_n is None else np.ascontiguousarray(c_n.transpose(1, 0, 2), dtype="<f4")
        row_bytes = outputs.shape[1] * outputs.shape[2] * 4
        step_bytes = outputs.shape[2] * 4
        state_bytes = hidden.shape[1] * hidden.shape[2] * 4
        out_view = memoryview(outputs.reshape(-1)).cast("B")
        hidden_view = memoryview(hidden.reshape(-1)).cast("B")
        cell_view = None if cell is None or not state_bytes else memoryview(cell.reshape(-1)).cast("B")
        hidden_head = _HIDDEN + _len_prefix(state_bytes) if state_bytes else b""
        cell_head = _CELL + _len_prefix(state_bytes) if cell_view is not None else b""
        tail = (len(hidden_head) + state_bytes if hidden_head else 0) + (
            len(cell_head) + state_bytes if cell_head else 0
        )
        good = iter(result.lengths.tolist())
        row = 0
    for index, word in enumerate(result.words):
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
