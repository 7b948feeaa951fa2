"""The charrnn.v1 gRPC service: the only module that touches protobuf messages."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np

from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from server.engine import Engine, EncodeResult, InitialState, WordEncoding
from server.errors import ModelsLoadingError, ServiceError
from server.metrics import Metrics
from server.runtime import ModelRuntime

logger = logging.getLogger(__name__)

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

    def attach(self, engine: Engine) -> None:
        """Start answering with this engine (until then RPCs get UNAVAILABLE: models are loading)."""
        self._engine = engine

    @property
    def engine(self) -> Engine:
        """The engine, or ModelsLoadingError while the server starts."""
        if self._engine is None:
            raise ModelsLoadingError("the server is still loading its models; retry shortly")
        return self._engine

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        """Unary encode; bad words fail the request unless the request asks for REPORT."""
        return await self._observed(
            "Encode", request.model, context, lambda: self._encode(request, default_report=False)
        )

    async def EncodeStream(
        self, request_iterator: AsyncIterator[pb.EncodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EncodeResponse]:
        """One response per request message, in order, with up to STREAM_PIPELINE_DEPTH messages in flight."""
        pending: asyncio.Queue[asyncio.Task[pb.EncodeResponse] | None] = asyncio.Queue(STREAM_PIPELINE_DEPTH)

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

    async def _stream_message(self, request: pb.EncodeRequest) -> pb.EncodeResponse:
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
        code = grpc.StatusCode.OK
        try:
            return await handler()
        except ServiceError as error:
            code = error.code
            logger.debug("%s %s: %s %s", method, model, code.name, error.message)
            await context.abort(code, error.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("%s %s failed", method, model)
            await context.abort(code, "internal error; see the server log")
        finally:
            self._record(method, model, code, started)
        raise AssertionError("unreachable: context.abort raises")

    def _record(self, method: str, model: str, code: grpc.StatusCode, started: float) -> None:
        label = model if self._engine is not None and model in self._engine.models else ""  # unknown names would grow the label set unboundedly
        self.metrics.requests.labels(method, label, code.name).inc()
        self.metrics.request_seconds.labels(method, label).observe(time.perf_counter() - started)

    async def _encode(self, request: pb.EncodeRequest, default_report: bool) -> pb.EncodeResponse:
        started = time.perf_counter()
        if request.invalid_words == pb.INVALID_WORD_POLICY_UNSPECIFIED:
            report = default_report
        else:
            report = request.invalid_words == pb.INVALID_WORD_POLICY_REPORT
        states = [
            InitialState(
                np.asarray(state.hidden, dtype=np.float32),
                np.asarray(state.cell, dtype=np.float32) if len(state.cell) else None,
            )
            for state in request.initial_states
        ]
        result = await self.engine.encode(request.model, list(request.words), states, report_invalid=report)
        self.metrics.words_per_request.labels(result.model.name).observe(len(request.words))
        return _response(result, started, self.metrics)

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


def _as_async(function: Callable[[], Response]) -> Callable[[], Awaitable[Response]]:
    @functools.wraps(function)
    async def call() -> Response:
        return function()

    return call


def _response(result: EncodeResult, started: float, metrics: Metrics) -> pb.EncodeResponse:
    manifest = result.model.manifest
    response = pb.EncodeResponse(model=manifest.name, hidden_size=manifest.hidden_size, num_layers=manifest.num_layers)
    add = response.results.add
    for item in result.words:
        if isinstance(item, WordEncoding):
            add(
                word=item.word,
                length=len(item.outputs),
                outputs=item.outputs.ravel().tolist(),
                hidden=item.hidden.ravel().tolist(),
                cell=item.cell.ravel().tolist() if item.cell is not None else (),
            )
        else:
            add(word=item.word, length=len(item.word), error=str(item))
    if result.stats is not None:
        metrics.queue_seconds.labels(manifest.name).observe(result.stats.queue_s)
        response.timing.queue_ms = result.stats.queue_s * 1000.0
        response.timing.inference_ms = result.stats.inference_s * 1000.0
    response.timing.total_ms = (time.perf_counter() - started) * 1000.0
    return response

