"""What every gRPC front end does around a handler: count and time it, and turn its errors into statuses.

One RpcRecorder per front end, over the server's one Metrics: charrnn.v1 and the Open Inference Protocol count
into the same metrics (method label = the RPC's name), which is what ModelStatistics reads back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Container
from typing import Any, TypeVar

import grpc

from server.core.errors import ServiceError
from server.grpc.status import abort, status_code
from server.metrics import Metrics

logger = logging.getLogger(__name__)

Response = TypeVar("Response")


class RpcRecorder:
    """Counts, times and error-maps RPCs into one Metrics; `models()` names the loaded models (None while loading)."""

    def __init__(self, metrics: Metrics, models: Callable[[], Container[str] | None]) -> None:
        self.metrics = metrics
        self._models = models
        # Metric children by label values: labels() is a locked dict lookup per call, these are plain lookups.
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
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
            self.record(method, model, grpc.StatusCode.OK, started)
            return response
        raise AssertionError("unreachable: context.abort raises")

    def record(self, method: str, model: str, code: grpc.StatusCode, started: float) -> None:
        """Count one RPC (or stream message) and its time since `started`."""
        # Unknown names would grow the label set without bound.
        models = self._models()
        label = model if models is not None and model in models else ""
        key = (method, label, code.name)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.metrics.requests.labels(method, label, code.name),
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
