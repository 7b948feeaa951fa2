"""Core errors -> gRPC statuses with google.rpc details, checked in isolation and over a real loopback server.

The server here is server.main.create_server() in-process (tests/helpers.py InProcessServer) on the torch-free
models of tests/onnx_models.py: real grpc.aio, real onnxruntime, a real channel; the client side decodes the
details with clients/errors.py, as every client of ours does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clients.client import CharRnnClient
from clients.errors import CharRnnError, error_from_rpc
from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from server.core.errors import (
    InvalidRequestError,
    InvalidWordError,
    ModelNotFoundError,
    ModelsLoadingError,
    OverloadedError,
    Reason,
    RequestTooLargeError,
    ShuttingDownError,
)
from server.grpc.status import ERROR_DOMAIN, INTERNAL_MESSAGE, rich_status, status_code
from tests.helpers import CHANNEL_OPTIONS, InProcessServer

pytestmark = pytest.mark.unit


def details_of(status: grpc.Status) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo | None]:
    """The ErrorInfo and RetryInfo packed into a status's grpc-status-details-bin trailer."""
    (key, value), = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    from google.rpc import status_pb2

    message = status_pb2.Status.FromString(value)
    assert message.code == status.code.value[0] and message.message == status.details
    info, retry = error_details_pb2.ErrorInfo(), None
    for detail in message.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    return info, retry


@pytest.mark.parametrize(
    ("error", "code", "reason", "retry"),
    [
        (ModelNotFoundError("no such model"), grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND, False),
        (InvalidRequestError("no words", Reason.NO_WORDS), grpc.StatusCode.INVALID_ARGUMENT, Reason.NO_WORDS, False),
        (InvalidWordError(3, "hex", "bad", Reason.WORD_NOT_IN_ALPHABET, 2), grpc.StatusCode.INVALID_ARGUMENT,
         Reason.WORD_NOT_IN_ALPHABET, False),
        (RequestTooLargeError("too many"), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_MANY_WORDS, False),
        (OverloadedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.QUEUE_FULL, True),
        (ShuttingDownError("draining"), grpc.StatusCode.UNAVAILABLE, Reason.SHUTTING_DOWN, True),
        (ModelsLoadingError("loading"), grpc.StatusCode.UNAVAILABLE, Reason.MODELS_LOADING, True),
    ],
)
def test_each_error_gets_its_code_reason_and_retry_advice(
    error: Exception, code: grpc.StatusCode, reason: Reason, retry: bool
) -> None:
    status = rich_status(error)
    assert status.code == code == status_code(error)
    assert status.details == str(error)
    info, retry_info = details_of(status)
    assert (info.domain, info.reason) == (ERROR_DOMAIN, reason)
    assert (retry_info is not None) == retry
    if retry_info is not None:
        assert retry_info.retry_delay.ToNanoseconds() > 0


def test_a_bad_word_names_its_index_and_position_in_the_metadata() -> None:
    info, _ = details_of(rich_status(InvalidWordError(3, "hex", "bad", Reason.WORD_NOT_IN_ALPHABET, 2)))
    assert dict(info.metadata) == {"word_index": "3", "position": "2"}


def test_a_bug_is_internal_with_a_generic_message() -> None:
    status = rich_status(KeyError("secret internals"))
    assert status.code == grpc.StatusCode.INTERNAL and status.details == INTERNAL_MESSAGE
    info, retry = details_of(status)
    assert info.reason == Reason.INTERNAL and retry is None
    assert "secret" not in repr(status)


# ---- over a real loopback server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(unit_repository: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(unit_repository)
    yield server
    server.stop()


def failure(call: object) -> CharRnnError:
    """The client library's error for a call expected to fail."""
    with pytest.raises(CharRnnError) as raised:
        call()  # type: ignore[operator]
    return raised.value


def test_errors_over_the_wire_carry_their_reason(served: InProcessServer) -> None:
    with CharRnnClient(served.target) as client:
        unknown = failure(lambda: client.encode("nope", ["hello"]))
        assert (unknown.code, unknown.reason, unknown.retryable) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", False)
        bad = failure(lambda: client.encode("lstm", ["hello", "hex"]))
        assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "WORD_NOT_IN_ALPHABET")
        assert bad.info.metadata == {"word_index": "1", "position": "2"}
        assert bad.details == "word 1 'hex': character 'x' at position 2 is not in the model's alphabet 'helo'"
        empty = failure(lambda: client.encode("lstm", []))
        assert (empty.code, empty.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "NO_WORDS")
        too_long = failure(lambda: client.encode("lstm", ["h" * 257]))
        assert too_long.reason == "WORD_TOO_LONG" and not too_long.retryable
        assert len(client.encode("lstm", ["hello"])) == 1  # and the server keeps serving


def test_a_word_of_100000_characters_gets_invalid_argument_not_an_overflowing_trailer(served: InProcessServer) -> None:
    with grpc.insecure_channel(served.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.CharRnnStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Encode(pb.EncodeRequest(model="lstm", words=["h" * 100_000]), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert len(raised.value.details()) < 300  # type: ignore[attr-defined]
        assert rpc_status.from_call(raised.value) is not None  # type: ignore[arg-type]
        assert error_from_rpc(raised.value).reason == "WORD_TOO_LONG"  # type: ignore[arg-type]


def test_a_stream_ends_with_the_status_of_its_failing_message(served: InProcessServer) -> None:
    with grpc.insecure_channel(served.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.CharRnnStub(channel)
        messages = [pb.EncodeRequest(model="lstm", words=["he"]), pb.EncodeRequest(model="nope", words=["he"])]
        received = []
        with pytest.raises(grpc.RpcError) as raised:
            for response in stub.EncodeStream(iter(messages), timeout=30):
                received.append(response)
        assert len(received) == 1
        error = error_from_rpc(raised.value)  # type: ignore[arg-type]
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


def test_a_draining_engine_answers_unavailable_shutting_down_which_is_retryable(unit_repository: Path) -> None:
    server = InProcessServer(unit_repository)
    try:
        server.call(server.running.engine.close())  # the engine drains first; the port still answers
        with CharRnnClient(server.target) as client:
            draining = failure(lambda: client.encode("lstm", ["hello"]))
        assert (draining.code, draining.reason, draining.retryable) == (
            grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", True
        )
        assert draining.info.retry_after_s is not None and draining.info.retry_after_s > 0
    finally:
        server.stop()
