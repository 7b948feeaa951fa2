"""The charrnn.v1 gRPC front end: charrnn.v1.CharRnn messages -> Engine calls -> response bytes.

A thin translation: requests are read into core types (charrnn_v1_codec.initial_state), the Engine does the
work, and responses are the wire bytes charrnn_v1_codec.encode_response() wrote. Encode and EncodeStream are
registered (add_to_server) with a response serialiser that passes those bytes through, so a response is never
parsed into a message and serialised again. Errors become statuses in status.py, counted here first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from proto.charrnn.v1 import charrnn_pb2 as pb
from server.core.engine import Engine
from server.core.errors import ModelsLoadingError, ServiceError
from server.core.runtime import ModelRuntime
from server.grpc.charrnn_v1_codec import encode_response, initial_state
from server.grpc.observed import RpcRecorder
from server.grpc.status import abort, status_code
from server.metrics import Metrics

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CharRnn"].full_name

STREAM_PIPELINE_DEPTH = 4
"""Stream messages a stream may have in flight at once; beyond that the server stops reading (flow control)."""

Response = TypeVar("Response")


class CharRnnService:
    """Translates charrnn.v1 messages to Engine calls and back.

    Not a subclass of the generated CharRnnServicer: Encode and EncodeStream return wire bytes, which only the
    handlers of method_handlers() (not add_CharRnnServicer_to_server's) know to send as they are.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._engine: Engine | None = None
        self._recorder = RpcRecorder(metrics, lambda: None if self._engine is None else self._engine.models)

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
                except grpc.aio.AbortError:
                    raise
                except ServiceError as error:
                    await abort(context, error)
                except Exception as error:
                    logger.exception("EncodeStream failed")
                    await abort(context, error)
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
            code = status_code(error)
            raise
        finally:
            self._recorder.record("EncodeStream", request.model, code, started)

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
        """Run a handler, count it, time it, and turn errors into statuses (server/grpc/observed.py)."""
        return await self._recorder.observed(method, model, context, handler)

    async def _encode(self, request: pb.EncodeRequest, default_report: bool) -> bytes:
        started = time.perf_counter()
        if request.invalid_words == pb.INVALID_WORD_POLICY_UNSPECIFIED:
            report = default_report
        else:
            report = request.invalid_words == pb.INVALID_WORD_POLICY_REPORT
        states = [initial_state(state) for state in request.initial_states]
        rows = await self.engine.encode_rows(request.model, list(request.words), states, report_invalid=report)
        words_per_request, queue_seconds = self._recorder.per_model(rows.model.name)
        words_per_request.observe(len(request.words))
        if rows.stats is not None:
            queue_seconds.observe(rows.stats.queue_s)
        return encode_response(rows, started)

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
    EncodeStream responses are the wire bytes encode_response() wrote (see module doc)."""
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
