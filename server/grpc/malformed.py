"""Request bytes that do not parse get INVALID_ARGUMENT on every service of the port, ours or not.

Our front ends (charrnn_v1, kserve_v2) take raw bytes and parse them themselves (observed.admit). The services
grpcio ships (grpc.health.v1, server reflection) register protobuf deserialisers, and a DecodeError there
reaches the client as `UNKNOWN: Unexpected <class 'google.protobuf.message.DecodeError'>`, a Python class
name. They register through a ParsingRegistrar, which wraps each handler's deserialiser once, so that bytes
that do not parse become a marker, and the handler's behaviour answers the marker with the same status our
services give: INVALID_ARGUMENT `request is not a valid <type>`, reason MALFORMED_REQUEST.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.core.errors import MalformedRequestError
from server.grpc.status import abort


class _Unparsed:
    """What a wrapped deserialiser returns for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: MalformedRequestError) -> None:
        self.error = error


def _deserializer(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(parse, "__self__", None)  # pb.X.FromString is a bound class method
    name = message_type.DESCRIPTOR.full_name if message_type is not None else "request message"

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _Unparsed(MalformedRequestError(f"request is not a valid {name}", metadata={"message_type": name}))

    return deserialize


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Unparsed):
            await abort(context, request.error)
        yield request


def _wrapped(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = _deserializer(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        behaviour = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Unparsed):
                await abort(context, request.error)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Unparsed):
                await abort(context, request.error)
            await _answered(streaming(request, context), context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
    if handler.stream_unary is not None:
        gathering = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await gathering(_checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
    bidirectional = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        await _answered(bidirectional(_checked(requests, context), context), context)

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


async def _answered(result: Any, context: grpc.aio.ServicerContext) -> None:
    """Send a wrapped streaming behaviour's responses: it may be a generator, or write with context.write
    itself (health's Watch) and return an awaitable."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            await context.write(response)
    else:
        await result


class ParsingRegistrar:
    """Stands in for the grpc server while grpcio's own services register (add_HealthServicer_to_server,
    add_ServerReflectionServicer_to_server), wrapping each handler's deserialiser once, at start-up; our own
    services register on the server itself and pay nothing per call."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(handler) for handler in generic_handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: _wrapped(handler) for name, handler in handlers.items()}
        )


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped, each once."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = self._inner.service(handler_call_details)
            self._wrapped[method] = None if handler is None else _wrapped(handler)
        return self._wrapped[method]
