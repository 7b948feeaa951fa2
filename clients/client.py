"""Python client for the charrnn.v1 service: numpy arrays per word, typed errors, retries only on UNAVAILABLE."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Retries happen in gRPC itself, only for UNAVAILABLE (server restarting, not yet listening); never for errors
# the server chose to return. round_robin spreads calls over every address a target resolves to.
SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "charrnn.v1.CharRnn"}, {"service": "grpc.health.v1.Health"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Channel options shared by the sync and asyncio clients."""
    return [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class CharRnnError(Exception):
    """An RPC failed; `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class ModelNotFoundError(CharRnnError):
    """NOT_FOUND: the server has no model of that name."""


class InvalidArgumentError(CharRnnError):
    """INVALID_ARGUMENT: a bad word, an empty request, or states of the wrong shape."""


class ResourceExhaustedError(CharRnnError):
    """RESOURCE_EXHAUSTED: too many words, too large a message, or the server's queue is full."""


class UnavailableError(CharRnnError):
    """UNAVAILABLE: the server is down, starting, draining, or unreachable (after retries)."""


class DeadlineExceededError(CharRnnError):
    """DEADLINE_EXCEEDED: the call's timeout passed."""


_ERRORS: dict[grpc.StatusCode, type[CharRnnError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def error_from_rpc(error: grpc.RpcError) -> CharRnnError:
    """The typed exception for a failed RPC."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details: str = error.details() or ""  # type: ignore[attr-defined]
    return _ERRORS.get(code, CharRnnError)(code, details)


@dataclass(frozen=True, slots=True)
class State:
    """A recurrent state to continue from: hidden [num_layers, hidden_size], cell likewise (LSTM only)."""

    hidden: npt.NDArray[np.float32]
    cell: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True, slots=True)
class Encoding:
    """One word's results; `error` is set (and arrays are empty) only for a reported bad word."""

    word: str
    outputs: npt.NDArray[np.float32]  # [length, hidden_size]
    hidden: npt.NDArray[np.float32]  # [num_layers, hidden_size]
    cell: npt.NDArray[np.float32] | None  # [num_layers, hidden_size], LSTM only
    error: str = ""

    @property
    def state(self) -> State:
        """The final state, to pass as the initial state of the word's continuation."""
        return State(self.hidden, self.cell)

    def to_json(self) -> dict[str, Any]:
        """The JSON shape the CLI and batch job print: word, outputs, hidden, cell (LSTM only) or error."""
        if self.error:
            return {"word": self.word, "error": self.error}
        record: dict[str, Any] = {"word": self.word, "outputs": self.outputs.tolist(), "hidden": self.hidden.tolist()}
        if self.cell is not None:
            record["cell"] = self.cell.tolist()
        return record


def build_request(
    model: str,
    words: Sequence[str],
    states: Sequence[State | None] | None = None,
    report_invalid: bool | None = None,
) -> pb.EncodeRequest:
    """An EncodeRequest; states, if given, are one per word (None for a fresh start)."""
    request = pb.EncodeRequest(model=model, words=words)
    if states is not None:
        if len(states) != len(words):
            raise ValueError(f"{len(states)} states for {len(words)} words: give one per word")
        for state in states:
            message = request.initial_states.add()
            if state is not None:
                message.hidden.extend(np.asarray(state.hidden, dtype=np.float32).ravel().tolist())
                if state.cell is not None:
                    message.cell.extend(np.asarray(state.cell, dtype=np.float32).ravel().tolist())
    if report_invalid is not None:
        request.invalid_words = pb.INVALID_WORD_POLICY_REPORT if report_invalid else pb.INVALID_WORD_POLICY_REJECT
    return request


def _fill_missing_states(request: pb.EncodeRequest, num_layers: int, hidden_size: int) -> None:
    # A None state in a list with others means "start from zeros"; the wire wants explicit values.
    for state in request.initial_states:
        if not state.hidden:
            state.hidden.extend([0.0] * (num_layers * hidden_size))


def parse_response(response: pb.EncodeResponse) -> list[Encoding]:
    """Per-word numpy arrays from an EncodeResponse."""
    layers, hidden = response.num_layers, response.hidden_size
    encodings = []
    for result in response.results:
        if result.error:
            empty = np.zeros((0, hidden), dtype=np.float32)  # no state: zeros could pass for a real one
            encodings.append(Encoding(result.word, empty, empty, None, result.error))
            continue
        encodings.append(
            Encoding(
                result.word,
                np.asarray(result.outputs, dtype=np.float32).reshape(result.length, hidden),
                np.asarray(result.hidden, dtype=np.float32).reshape(layers, hidden),
                np.asarray(result.cell, dtype=np.float32).reshape(layers, hidden) if len(result.cell) else None,
            )
        )
    return encodings


class CharRnnClient:
    """Blocking client; use as a context manager. Every call takes a timeout overriding the default."""

    def __init__(self, target: str, timeout: float = DEFAULT_TIMEOUT_S, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.CharRnnStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._shapes: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> CharRnnClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def encode(
        self,
        model: str,
        words: Sequence[str],
        states: Sequence[State | None] | None = None,
        *,
        report_invalid: bool = False,
        timeout: float | None = None,
    ) -> list[Encoding]:
        """Encode words with a model; one Encoding per word, in order."""
        request = build_request(model, words, states, report_invalid)
        if states is not None and any(state is None for state in states):
            _fill_missing_states(request, *self._shape(model, timeout))
        return parse_response(self._call(self._stub.Encode, request, timeout))

    def encode_stream(
        self, requests: Iterable[pb.EncodeRequest], *, timeout: float | None = None
    ) -> Iterable[list[Encoding]]:
        """Bulk encoding over the streaming RPC: one list of Encodings per request, in order."""
        try:
            for response in self._stub.EncodeStream(iter(requests), timeout=timeout):
                yield parse_response(response)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def models(self, *, timeout: float | None = None) -> list[pb.ModelMetadata]:
        """Metadata of every model the server has loaded."""
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def model(self, name: str, *, timeout: float | None = None) -> pb.ModelMetadata:
        """One model's metadata (ModelNotFoundError if unknown)."""
        return self._call(self._stub.GetModel, pb.GetModelRequest(name=name), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health service's status name for the server (or one service): SERVING, NOT_SERVING, ..."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _shape(self, model: str, timeout: float | None) -> tuple[int, int]:
        if model not in self._shapes:
            metadata = self.model(model, timeout=timeout)
            self._shapes[model] = (metadata.num_layers, metadata.hidden_size)
        return self._shapes[model]

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None


class AsyncCharRnnClient:
    """asyncio client; use as an async context manager. Same calls and errors as CharRnnClient."""

    def __init__(self, target: str, timeout: float = DEFAULT_TIMEOUT_S, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.CharRnnStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._shapes: dict[str, tuple[int, int]] = {}

    async def __aenter__(self) -> AsyncCharRnnClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def encode(
        self,
        model: str,
        words: Sequence[str],
        states: Sequence[State | None] | None = None,
        *,
        report_invalid: bool = False,
        timeout: float | None = None,
    ) -> list[Encoding]:
        """Encode words with a model; one Encoding per word, in order."""
        request = build_request(model, words, states, report_invalid)
        if states is not None and any(state is None for state in states):
            _fill_missing_states(request, *await self._shape(model, timeout))
        return parse_response(await self._call(self._stub.Encode, request, timeout))

    async def _shape(self, model: str, timeout: float | None) -> tuple[int, int]:
        if model not in self._shapes:
            metadata = await self.model(model, timeout=timeout)
            self._shapes[model] = (metadata.num_layers, metadata.hidden_size)
        return self._shapes[model]

    async def models(self, *, timeout: float | None = None) -> list[pb.ModelMetadata]:
        """Metadata of every model the server has loaded."""
        return list((await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)).models)

    async def model(self, name: str, *, timeout: float | None = None) -> pb.ModelMetadata:
        """One model's metadata (ModelNotFoundError if unknown)."""
        return await self._call(self._stub.GetModel, pb.GetModelRequest(name=name), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health service's status name for the server (or one service)."""
        response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
