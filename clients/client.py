"""Python client for the charrnn.v1 service: numpy arrays per word, typed errors, retries only on UNAVAILABLE.

CharRnnClient (blocking) and AsyncCharRnnClient (asyncio) are thin: each RPC is one line of I/O (`stub.X(...)`
or `await stub.X(...)`) between request building and response parsing they share in _ClientCore. Callers see
the library's own values (Encoding, State, ModelInfo, EncodeRequest) and errors (clients/errors.py), never
protobuf messages or raw grpc errors. `security=ClientSecurity.from_files(tls_ca=..., token_file=...)`
(clients/security.py) connects with TLS, mTLS and a bearer token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.errors import (  # noqa: F401 - re-exported: the library's errors
    CharRnnError,
    DeadlineExceededError,
    ErrorDetails,
    InvalidArgumentError,
    ModelNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    error_from_rpc,
)
from clients.security import PLAINTEXT, ClientSecurity
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


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES, own_connection: bool = False) -> list[tuple[str, Any]]:
    """Channel options shared by the sync and asyncio clients. own_connection: a TCP connection of this channel's
    own (gRPC otherwise shares one between the channels of a process to the same target): a server's
    --workers spread connections, not requests."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


FIELDS = ("outputs", "hidden", "cell")
"""The arrays a request can ask for (EncodeRequest.fields; all of them by default)."""
_FIELD_ENUMS = {"outputs": pb.RESULT_FIELD_OUTPUTS, "hidden": pb.RESULT_FIELD_HIDDEN, "cell": pb.RESULT_FIELD_CELL}


def parse_fields(text: str) -> tuple[str, ...]:
    """A --fields value, e.g. "hidden" or "outputs,hidden", as names of FIELDS; "all" (or empty) is all of them."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or names == ("all",):
        return FIELDS
    unknown = [name for name in names if name not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}: choose from {', '.join(FIELDS)} (or all)")
    return names


# ---- values -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class State:
    """A recurrent state to continue from: hidden [num_layers, hidden_size], cell likewise (LSTM only)."""

    hidden: npt.NDArray[np.float32]
    cell: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True, slots=True)
class Encoding:
    """One word's results; `error` is set (and arrays are empty) only for a reported bad word. An array the
    request's `fields` left out is None."""

    word: str
    outputs: npt.NDArray[np.float32] | None  # [length, hidden_size]
    hidden: npt.NDArray[np.float32] | None  # [num_layers, hidden_size]
    cell: npt.NDArray[np.float32] | None  # [num_layers, hidden_size], LSTM only
    error: str = ""
    version: int = 0
    """The model version that encoded the word (0 from a server that does not say)."""

    @property
    def state(self) -> State:
        """The final state, to pass as the initial state of the word's continuation (needs `hidden`)."""
        if self.hidden is None:
            raise ValueError(f"{self.word!r}: the hidden state was not requested (fields)")
        return State(self.hidden, self.cell)

    def to_json(self) -> dict[str, Any]:
        """The JSON shape the CLI and batch job print: word, version, outputs, hidden, cell (LSTM only), each
        array only if requested; or word and error."""
        if self.error:
            return {"word": self.word, "error": self.error}
        record: dict[str, Any] = {"word": self.word, "version": self.version}
        for name in FIELDS:
            array = getattr(self, name)
            if array is not None:
                record[name] = array.tolist()
        return record


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version of a model as the server reports it."""

    version: int
    state: str
    """ready, failed or unloading."""
    error: str = ""
    """Why it failed to load (failed), or why a reload of it was refused (ready)."""
    default: bool = False
    """Whether requests without a version get this one."""

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON values."""
        return {"version": self.version, "state": self.state, "error": self.error, "default": self.default}


_VERSION_STATES = {
    pb.VERSION_STATE_READY: "ready", pb.VERSION_STATE_FAILED: "failed", pb.VERSION_STATE_UNLOADING: "unloading",
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model's metadata (ListModels, GetModel)."""

    name: str
    kind: str
    """rnn, lstm or gru."""
    input_size: int
    hidden_size: int
    num_layers: int
    nonlinearity: str | None
    """tanh or relu for an rnn; None for the others."""
    alphabet: str
    """One-hot order: alphabet[i] is input i."""
    execution_provider: str
    """The onnxruntime provider actually running the model."""
    max_word_length: int
    artifact_sha256: dict[str, str]
    """File name -> SHA-256 of each of the model's artifacts."""
    version: int = 0
    """The version this describes: the default one, unless a version was asked for."""
    versions: tuple[VersionInfo, ...] = ()
    """Every version the server knows of for this model, oldest first, with its state."""

    @property
    def state_shape(self) -> tuple[int, int]:
        """(num_layers, hidden_size): the shape of a State's hidden (and cell) array."""
        return self.num_layers, self.hidden_size

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON values (what `charrnn models --json` prints)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "nonlinearity": self.nonlinearity,
            "alphabet": self.alphabet,
            "execution_provider": self.execution_provider,
            "max_word_length": self.max_word_length,
            "artifact_sha256": dict(sorted(self.artifact_sha256.items())),
            "version": self.version,
            "versions": [version.to_json() for version in self.versions],
        }


@dataclass(frozen=True, slots=True)
class EncodeRequest:
    """One request of a stream (encode_stream): words for a model, optionally a starting state per word."""

    model: str
    words: Sequence[str]
    states: Sequence[State | None] | None = None
    """One per word (None: start that word from zeros), or None: every word starts from zeros."""
    report_invalid: bool = True
    """Report a bad word in its own Encoding (the stream's default) instead of failing the whole stream."""
    version: int = 0
    """The model version to use; 0: the model's default (its highest loaded version)."""
    fields: Sequence[str] | None = None
    """The arrays to send back (names of FIELDS); None: all of them."""


# ---- wire format ------------------------------------------------------------------------------------------------


def build_request(
    model: str,
    words: Sequence[str],
    states: Sequence[State | None] | None = None,
    report_invalid: bool | None = None,
    version: int = 0,
    fields: Sequence[str] | None = None,
) -> pb.EncodeRequest:
    """An EncodeRequest message; states, if given, are one per word (None for a fresh start, sent empty);
    version 0 asks for the model's default version; fields (names of FIELDS), the arrays to send back
    (None or all of them: nothing is sent, which the server reads as all)."""
    request = pb.EncodeRequest(model=model, words=words, version=version)
    if fields is not None and set(fields) != set(FIELDS):
        unknown = [name for name in fields if name not in _FIELD_ENUMS]
        if unknown or not fields:
            raise ValueError(f"fields must name some of {', '.join(FIELDS)}, not {list(fields)}")
        request.fields.extend(_FIELD_ENUMS[name] for name in fields)
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


def parse_response(response: pb.EncodeResponse) -> list[Encoding]:
    """Per-word numpy arrays from an EncodeResponse."""
    layers, hidden, version = response.num_layers, response.hidden_size, response.version
    encodings = []
    for result in response.results:
        if result.error:
            empty = np.zeros((0, hidden), dtype=np.float32)  # no state: zeros could pass for a real one
            encodings.append(Encoding(result.word, empty, empty, None, result.error, version))
            continue
        # An array left out (EncodeRequest.fields) arrives empty; a good word's arrays never are.
        encodings.append(
            Encoding(
                result.word,
                np.asarray(result.outputs, dtype=np.float32).reshape(result.length, hidden) if len(result.outputs) else None,
                np.asarray(result.hidden, dtype=np.float32).reshape(layers, hidden) if len(result.hidden) else None,
                np.asarray(result.cell, dtype=np.float32).reshape(layers, hidden) if len(result.cell) else None,
                version=version,
            )
        )
    return encodings


def parse_model(metadata: pb.ModelMetadata) -> ModelInfo:
    """A ModelMetadata message as a ModelInfo."""
    return ModelInfo(
        name=metadata.name,
        kind=metadata.kind,
        input_size=metadata.input_size,
        hidden_size=metadata.hidden_size,
        num_layers=metadata.num_layers,
        nonlinearity=metadata.nonlinearity or None,
        alphabet=metadata.alphabet,
        execution_provider=metadata.execution_provider,
        max_word_length=metadata.max_word_length,
        artifact_sha256=dict(metadata.artifact_sha256),
        version=metadata.version,
        versions=tuple(
            VersionInfo(status.version, _VERSION_STATES.get(status.state, "unknown"), status.error, status.is_default)
            for status in metadata.versions
        ),
    )


class _StreamFeed:
    """What went wrong producing one stream's requests (the caller's iterator raised, or a model lookup failed).

    gRPC's sender must not see the exception (the sync one logs it and fails the call as UNKNOWN, the asyncio
    one never half-closes the stream): the feed records it and ends the requests, the responses to the
    requests already sent are delivered, and then the exception is raised to the caller.
    """

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None

    def raise_error(self) -> None:
        """Re-raise the recorded exception, if any."""
        if self.error is not None:
            raise self.error


# ---- the clients ------------------------------------------------------------------------------------------------


class _ClientCore:
    """All the sync and asyncio clients share: the stubs, the default timeout, the model-shape cache, and turning
    the library's values into messages and back. No I/O here: the subclasses make the calls."""

    def __init__(
        self, target: str, timeout: float, channel: grpc.Channel | grpc.aio.Channel, security: ClientSecurity
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.security = security
        self._channel = channel
        self._stub = pb_grpc.CharRnnStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._shapes: dict[str, tuple[int, int]] = {}

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _needs_shape(self, request: EncodeRequest) -> bool:
        # A None state among given ones means "start from zeros"; the wire wants the zeros spelt out, so the
        # model's shape must be known (one GetModel per model, then cached).
        if not isinstance(request, EncodeRequest):  # e.g. a protobuf EncodeRequest, which this API no longer takes
            kind = f"{type(request).__module__}.{type(request).__qualname__}"
            raise TypeError(f"encode_stream takes clients.client.EncodeRequest values, not {kind}")
        states = request.states
        return states is not None and request.model not in self._shapes and any(state is None for state in states)

    def _message(self, request: EncodeRequest) -> pb.EncodeRequest:
        message = build_request(
            request.model, request.words, request.states, request.report_invalid, request.version, request.fields
        )
        if request.states is not None and any(state is None for state in request.states):
            layers, hidden = self._shapes[request.model]
            for state in message.initial_states:
                if not state.hidden:
                    state.hidden.extend([0.0] * (layers * hidden))
        return message

    def _model_info(self, metadata: pb.ModelMetadata) -> ModelInfo:
        info = parse_model(metadata)
        self._shapes[info.name] = info.state_shape
        return info

    def _model_infos(self, response: pb.ListModelsResponse) -> list[ModelInfo]:
        return [self._model_info(metadata) for metadata in response.models]

    @staticmethod
    def _status_name(response: health_pb2.HealthCheckResponse) -> str:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


_LIST_MODELS = pb.ListModelsRequest()


def _health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


class CharRnnClient(_ClientCore):
    """Blocking client; use as a context manager. Every call takes a timeout overriding the default."""

    def __init__(
        self, target: str, timeout: float = DEFAULT_TIMEOUT_S, max_message_bytes: int = MAX_MESSAGE_BYTES,
        security: ClientSecurity = PLAINTEXT, own_connection: bool = False,
    ) -> None:
        channel = security.channel(target, channel_options(max_message_bytes, own_connection))
        super().__init__(target, timeout, channel, security)

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
        version: int = 0,
        fields: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> list[Encoding]:
        """Encode words with a model (its default version, or `version`); one Encoding per word, in order, with
        the arrays `fields` names (of FIELDS; None: all), the others None."""
        message = self._request(EncodeRequest(model, words, states, report_invalid, version, fields), timeout)
        return parse_response(self._call(self._stub.Encode, message, timeout))

    def encode_stream(self, requests: Iterable[EncodeRequest], *, timeout: float | None = None) -> Iterator[list[Encoding]]:
        """Bulk encoding over the streaming RPC: one list of Encodings per request, in order. No deadline
        unless `timeout` is given."""
        feed = _StreamFeed()
        call = self._stub.EncodeStream(self._stream_requests(requests, feed, timeout), timeout=timeout)
        try:
            for response in call:
                yield parse_response(response)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.security.tls) from None
        finally:
            call.cancel()  # the caller stopped early: end the stream (a no-op once it has ended)
        feed.raise_error()

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Metadata of every model the server has loaded."""
        return self._model_infos(self._call(self._stub.ListModels, _LIST_MODELS, timeout))

    def model(self, name: str, *, version: int = 0, timeout: float | None = None) -> ModelInfo:
        """One model's metadata, its default version's or `version`'s (ModelNotFoundError if unknown)."""
        return self._model_info(self._call(self._stub.GetModel, pb.GetModelRequest(name=name, version=version), timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health service's status name for the server (or one service): SERVING, NOT_SERVING, ..."""
        return self._status_name(self._call(self._health.Check, _health_request(service), timeout))

    def _stream_requests(
        self, requests: Iterable[EncodeRequest], feed: _StreamFeed, timeout: float | None
    ) -> Iterator[pb.EncodeRequest]:
        try:
            for request in requests:
                yield self._request(request, timeout)
        except Exception as error:  # handed to the caller by encode_stream (see _StreamFeed)
            feed.error = error

    def _request(self, request: EncodeRequest, timeout: float | None) -> pb.EncodeRequest:
        if self._needs_shape(request):
            self.model(request.model, timeout=timeout)
        return self._message(request)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.security.tls) from None


class AsyncCharRnnClient(_ClientCore):
    """asyncio client; use as an async context manager. Same calls and errors as CharRnnClient."""

    def __init__(
        self, target: str, timeout: float = DEFAULT_TIMEOUT_S, max_message_bytes: int = MAX_MESSAGE_BYTES,
        security: ClientSecurity = PLAINTEXT, own_connection: bool = False,
    ) -> None:
        channel = security.aio_channel(target, channel_options(max_message_bytes, own_connection))
        super().__init__(target, timeout, channel, security)

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
        version: int = 0,
        fields: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> list[Encoding]:
        """Encode words with a model (its default version, or `version`); one Encoding per word, in order, with
        the arrays `fields` names (of FIELDS; None: all), the others None."""
        message = await self._request(EncodeRequest(model, words, states, report_invalid, version, fields), timeout)
        return parse_response(await self._call(self._stub.Encode, message, timeout))

    async def encode_stream(
        self, requests: Iterable[EncodeRequest] | AsyncIterable[EncodeRequest], *, timeout: float | None = None
    ) -> AsyncIterator[list[Encoding]]:
        """Bulk encoding over the streaming RPC (`async for`): one list of Encodings per request, in order.
        The requests may come from a plain or an async iterable. No deadline unless `timeout` is given."""
        feed = _StreamFeed()
        call = self._stub.EncodeStream(self._stream_requests(requests, feed, timeout), timeout=timeout)
        try:
            async for response in call:
                yield parse_response(response)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.security.tls) from None
        finally:
            call.cancel()  # the caller stopped early: end the stream (a no-op once it has ended)
        feed.raise_error()

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Metadata of every model the server has loaded."""
        return self._model_infos(await self._call(self._stub.ListModels, _LIST_MODELS, timeout))

    async def model(self, name: str, *, version: int = 0, timeout: float | None = None) -> ModelInfo:
        """One model's metadata, its default version's or `version`'s (ModelNotFoundError if unknown)."""
        return self._model_info(
            await self._call(self._stub.GetModel, pb.GetModelRequest(name=name, version=version), timeout)
        )

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health service's status name for the server (or one service): SERVING, NOT_SERVING, ..."""
        return self._status_name(await self._call(self._health.Check, _health_request(service), timeout))

    async def _stream_requests(
        self, requests: Iterable[EncodeRequest] | AsyncIterable[EncodeRequest], feed: _StreamFeed,
        timeout: float | None,
    ) -> AsyncIterator[pb.EncodeRequest]:
        try:
            async for request in _aiter(requests):
                yield await self._request(request, timeout)
        except Exception as error:  # handed to the caller by encode_stream (see _StreamFeed)
            feed.error = error

    async def _request(self, request: EncodeRequest, timeout: float | None) -> pb.EncodeRequest:
        if self._needs_shape(request):
            await self.model(request.model, timeout=timeout)
        return self._message(request)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.security.tls) from None


async def _aiter(items: Iterable[EncodeRequest] | AsyncIterable[EncodeRequest]) -> AsyncIterator[EncodeRequest]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
