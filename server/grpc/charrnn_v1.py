"""The charrnn.v1 gRPC front end: charrnn.v1.CharRnn messages -> Engine calls -> response bytes.

A thin translation: requests are read into core types (charrnn_v1_codec.initial_state), the Engine does the
work, and responses are the wire bytes charrnn_v1_codec.encode_response() wrote. Encode and EncodeStream are
registered (add_to_server) with a response serialiser that passes those bytes through, so a response is never
parsed into a message and serialised again. Errors become statuses in status.py, counted here first.

Requests arrive as raw bytes (no request deserialiser) and are parsed by the handler (observed.admit, through
FrontEnd.admitted for unary RPCs): bytes that do not parse get INVALID_ARGUMENT/MALFORMED_REQUEST naming the
message type, on every RPC and every stream message, instead of gRPC's UNKNOWN naming a Python exception
class. admit() also counts the bytes against the server's ByteBudget until the response is handed back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from proto.charrnn.v1 import charrnn_pb2 as pb
from server.core.engine import VersionState
from server.core.errors import ServiceError
from server.core.runtime import ModelRuntime
from server.grpc.charrnn_v1_codec import encode_response, initial_state, result_fields
from server.grpc.observed import ANSWERED_VERSION, FrontEnd, admit, in_order
from server.grpc.status import abort, status_code

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CharRnn"].full_name

STREAM_PIPELINE_DEPTH = 4
"""Stream messages a stream may have in flight at once; beyond that the server stops reading (flow control)."""

Response = TypeVar("Response")
Request = TypeVar("Request", bound=Message)

_VERSION_STATES = {
    VersionState.READY: pb.VERSION_STATE_READY,
    VersionState.FAILED: pb.VERSION_STATE_FAILED,
    VersionState.UNLOADING: pb.VERSION_STATE_UNLOADING,
}


class CharRnnService(FrontEnd):
    """Translates charrnn.v1 messages to Engine calls and back.

    Not a subclass of the generated CharRnnServicer: Encode and EncodeStream return wire bytes, which only the
    handlers of method_handlers() (not add_CharRnnServicer_to_server's) know to send as they are.
    """

    async def Encode(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Unary encode; bad words fail the request unless the request asks for REPORT. Returns the wire bytes."""
        return await self.admitted("Encode", pb.EncodeRequest, data, context, lambda request: self._observed(
            "Encode", request.model, context, lambda: self._encode(request, default_report=False)
        ))

    async def EncodeStream(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """One response per request message, in order, with up to STREAM_PIPELINE_DEPTH messages in flight; the
        first message that fails ends the stream with its status."""
        try:
            async with contextlib.aclosing(
                in_order(request_iterator, self._stream_message, STREAM_PIPELINE_DEPTH)
            ) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except ServiceError as error:
            await abort(context, error)
        except Exception as error:
            logger.exception("EncodeStream failed")
            await abort(context, error)

    async def _stream_message(self, data: bytes) -> bytes:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        model = ""
        try:
            request = admit(self.budget, pb.EncodeRequest, data)  # taken here, so a task cancelled unstarted holds nothing
        except ServiceError as error:
            self._recorder.record("EncodeStream", model, status_code(error), started)
            raise
        try:
            model = request.model
            return await self._encode(request, default_report=True)
        except BaseException as error:
            code = status_code(error)
            raise
        finally:
            self.budget.give(len(data))
            self._recorder.record("EncodeStream", model, code, started, ANSWERED_VERSION.get())

    async def ListModels(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        """Metadata of every loaded model, sorted by name."""
        return await self.admitted("ListModels", pb.ListModelsRequest, data, context, lambda _: self._observed(
            "ListModels", "", context, _as_async(lambda: pb.ListModelsResponse(
                models=[self._metadata(m) for _, m in sorted(self.engine.models.items())]
            )),
        ))

    async def GetModel(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelMetadata:
        """One model's metadata: its default version's, or the loaded version asked for."""
        return await self.admitted("GetModel", pb.GetModelRequest, data, context, lambda request: self._observed(
            "GetModel", request.name, context,
            _as_async(lambda: self._metadata(self.engine.model(request.name, request.version))),
        ))

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
        rows = await self.engine.encode_rows(
            request.model, list(request.words), states, report_invalid=report, version=request.version
        )
        ANSWERED_VERSION.set(str(rows.model.version))
        words_per_request, queue_seconds = self._recorder.per_model(rows.model.name)
        words_per_request.observe(len(request.words))
        if rows.stats is not None:
            queue_seconds.observe(rows.stats.queue_s)
        return encode_response(rows, started, result_fields(request.fields))

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
            version=model.version,
            versions=[
                pb.VersionStatus(
                    version=status.version, state=_VERSION_STATES[status.state], error=status.error,
                    is_default=status.default,
                )
                for status in self.engine.version_statuses(manifest.name)
            ],
        )


def add_to_server(service: CharRnnService, server: grpc.aio.Server) -> None:
    """Register the service like the generated add_CharRnnServicer_to_server, except that Encode and
    EncodeStream responses are the wire bytes encode_response() wrote (see module doc)."""
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def method_handlers(service: CharRnnService) -> dict[str, grpc.RpcMethodHandler]:
    """Every charrnn.v1.CharRnn method's handler, by method name. Requests reach the handlers as bytes (no
    request deserialiser): each handler parses its own (observed.admit), so malformed bytes get a clear
    status; REQUEST_TYPES says which message each one parses."""
    return {
        "Encode": grpc.unary_unary_rpc_method_handler(service.Encode, response_serializer=_wire_bytes),
        "EncodeStream": grpc.stream_stream_rpc_method_handler(service.EncodeStream, response_serializer=_wire_bytes),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString
        ),
        "GetModel": grpc.unary_unary_rpc_method_handler(
            service.GetModel, response_serializer=pb.ModelMetadata.SerializeToString
        ),
    }


REQUEST_TYPES: dict[str, type[Message]] = {
    "Encode": pb.EncodeRequest,
    "EncodeStream": pb.EncodeRequest,
    "ListModels": pb.ListModelsRequest,
    "GetModel": pb.GetModelRequest,
}
"""The request message each handler of method_handlers() parses from the bytes it is given."""


def _wire_bytes(response: bytes) -> bytes:
    return response


def _as_async(function: Callable[[], Response]) -> Callable[[], Awaitable[Response]]:
    @functools.wraps(function)
    async def call() -> Response:
        return function()

    return call
