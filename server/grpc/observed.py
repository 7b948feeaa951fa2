"""What every gRPC front end does around a handler: count and time it, and turn its errors into statuses.

One RpcRecorder per front end, over the server's one Metrics: charrnn.v1 and the Open Inference Protocol count
into the same metrics (method label = the RPC's name), which is what ModelStatistics reads back.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from server.core.admission import ByteBudget
from server.core.engine import Engine
from server.core.errors import MalformedRequestError, ModelsLoadingError, ServiceError
from server.grpc.status import abort, status_code
from server.metrics import Metrics

logger = logging.getLogger(__name__)

Response = TypeVar("Response")
Request = TypeVar("Request", bound=Message)

ANSWERED_VERSION: contextvars.ContextVar[str] = contextvars.ContextVar("answered_version", default="")
"""The model version that answered the RPC in this task, set by the handler once it knows; the request counter's
version label (empty for RPCs no version answered)."""


class FrontEnd:
    """What every gRPC front end holds: the server's one Metrics and byte budget, its RpcRecorder, and the engine
    once the models are loaded (until attach(), RPCs that need it get UNAVAILABLE: models are loading)."""

    def __init__(self, metrics: Metrics, budget: ByteBudget | None = None) -> None:
        self.metrics = metrics
        self.budget = budget if budget is not None else ByteBudget(1 << 62)
        """Request bytes in flight, shared with the server's other front ends."""
        self._engine: Engine | None = None
        self._recorder = RpcRecorder(metrics, lambda: None if self._engine is None else self._engine.models)

    def attach(self, engine: Engine) -> None:
        """Start answering with this engine."""
        self._engine = engine

    @property
    def engine(self) -> Engine:
        """The engine, or ModelsLoadingError while the server starts."""
        if self._engine is None:
            raise ModelsLoadingError("the server is still loading its models; retry shortly")
        return self._engine

    async def admitted(
        self,
        method: str,
        message_type: type[Request],
        data: bytes,
        context: grpc.aio.ServicerContext,
        answer: Callable[[Request], Awaitable[Response]],
    ) -> Response:
        """Parse a unary request against the byte budget (admit()) and answer it; a request refused before it
        ran (bytes that do not parse, the budget full) is counted and answered by observed(). The request's
        bytes are given back once it is answered."""
        try:
            request = admit(self.budget, message_type, data)
        except ServiceError as error:
            return await self._recorder.observed(method, "", context, raising(error))
        try:
            return await answer(request)
        finally:
            self.budget.give(len(data))


class RpcRecorder:
    """Counts, times and error-maps RPCs into one Metrics; `models()` names the loaded models (None while loading)."""

    def __init__(self, metrics: Metrics, models: Callable[[], Container[str] | None]) -> None:
        self.metrics = metrics
        self._models = models
        # Metric children by label values: labels() is a locked dict lookup per call, these are plain lookups.
        self._request_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._model_children: dict[str, tuple[Any, Any]] = {}

    async def observed(
        self,
        method: str,
        model: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[], Awaitable[Response]],
    ) -> Response:
        """Run a handler, count it, time it, and turn errors into statuses (tracebacks go to the log only)."""
        started = time.perf_counter()
        ANSWERED_VERSION.set("")
        try:
            response = await handler()
        except ServiceError as error:
            code = status_code(error)
            logger.debug("%s %s: %s %s %s", method, model, code.name, error.reason, error.message)
            # Counted before the status leaves: a client reading /metrics right after sees its call.
            self.record(method, model, code, started)
            await abort(context, error)
        except asyncio.CancelledError:
            # grpc.aio cancels the handler both when the client cancels and when its deadline passes.
            expired = context.time_remaining() is not None and context.time_remaining() <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self.record(method, model, code, started)
            raise
        except Exception as error:
            logger.exception("%s %s failed", method, model)
            self.record(method, model, grpc.StatusCode.INTERNAL, started)
            await abort(context, error)
        else:
            self.record(method, model, grpc.StatusCode.OK, started, ANSWERED_VERSION.get())
            return response
        raise AssertionError("unreachable: context.abort raises")

    def record(self, method: str, model: str, code: grpc.StatusCode, started: float, version: str = "") -> None:
        """Count one RPC (or stream message) and its time since `started`; `version` is the one that answered."""
        # Unknown names would grow the label set without bound; versions are only those that answered.
        models = self._models()
        label = model if models is not None and model in models else ""
        key = (method, label, version, code.name)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.metrics.requests.labels(method, label, version, code.name),
                self.metrics.request_seconds.labels(method, label),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def per_model(self, model: str) -> tuple[Any, Any]:
        """(words_per_request, queue_seconds) metric children of a loaded model."""
        children = self._model_children.get(model)
        if children is None:
            children = self._model_children[model] = (
                self.metrics.words_per_request.labels(model),
                self.metrics.queue_seconds.labels(model),
            )
        return children


def admit(budget: ByteBudget, message_type: type[Request], data: bytes) -> Request:
    """Take a request's bytes from the server-wide budget and parse them. Bytes that do not parse are
    MalformedRequestError (INVALID_ARGUMENT naming the expected type), never gRPC's UNKNOWN; on any error nothing
    stays taken. The caller gives len(data) back once it has answered."""
    budget.take(len(data))
    try:
        return message_type.FromString(data)
    except DecodeError:
        budget.give(len(data))
        raise MalformedRequestError(
            f"request is not a valid {message_type.DESCRIPTOR.full_name}",
            metadata={"message_type": message_type.DESCRIPTOR.full_name},
        ) from None


def raising(error: ServiceError) -> Callable[[], Awaitable[Any]]:
    """A handler that fails with `error`: lets observed() count and answer a request refused before it ran."""

    async def call() -> Any:
        raise error

    return call


T = TypeVar("T")


async def in_order(
    messages: AsyncIterator[bytes], handle: Callable[[bytes], Awaitable[T]], depth: int
) -> AsyncIterator[T]:
    """The results of a stream's messages, in order, with up to `depth` handled at once; beyond that the stream
    is not read (flow control). A handler's exception comes out here, as does one of the request stream itself.
    Use it under contextlib.aclosing(), so that stopping early cancels the messages still in hand at once."""
    pending: asyncio.Queue[asyncio.Task[T] | None] = asyncio.Queue(depth)

    async def read() -> None:
        try:
            async for data in messages:
                await pending.put(asyncio.ensure_future(handle(data)))
        finally:
            await pending.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while (task := await pending.get()) is not None:
            yield await task
        await reader  # surface a failure of the request stream itself
    finally:
        reader.cancel()
        while not pending.empty():
            leftover = pending.get_nowait()
            if leftover is not None:
                leftover.cancel()
