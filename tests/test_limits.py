"""The resource bounds a user can state are enforced, not merely passed to gRPC (docs/security.md, "Bounds").

Each test provokes one bound on an in-process server (tests/helpers.py InProcessServer: real grpc.aio, real
onnxruntime, a real loopback channel) and checks what a client sees: the byte budget refuses with a retryable
REQUEST_BYTES_IN_FLIGHT while the rest are exact; a connection carries at most --max-concurrent-streams RPCs at
once; --max-connection-age-s ends a long stream with GOAWAY; --max-connection-idle-s closes an idle connection;
a client pinging more often than --keepalive-min-ping-interval-s is sent GOAWAY (too_many_pings). The last
three take real seconds, so they are `e2e`, not `unit`.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients.client import AsyncCharRnnClient, CharRnnClient, CharRnnError
from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from tests.helpers import InProcessServer

WORD = "he"


class HeldStream:
    """An EncodeStream kept open: one message answered, then nothing sent until close()."""

    def __init__(self, stub: pb_grpc.CharRnnStub, timeout: float = 20.0) -> None:
        self._messages: queue.Queue[pb.EncodeRequest | None] = queue.Queue()
        self.call = stub.EncodeStream(iter(self._messages.get, None), timeout=timeout)
        self._messages.put(pb.EncodeRequest(model="rnn", words=[WORD]))
        next(self.call)

    def wait_for_end(self) -> grpc.RpcError | None:
        """Block until the server ends the stream; its error, or None if it ended OK."""
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as error:
            return error
        return None

    def close(self) -> None:
        self._messages.put(None)
        self.wait_for_end()


def encode_one(stub: pb_grpc.CharRnnStub, timeout: float = 5.0) -> int:
    return len(stub.Encode(pb.EncodeRequest(model="rnn", words=[WORD]), timeout=timeout).results)


@pytest.mark.unit
def test_the_byte_budget_refuses_with_a_retryable_status_and_answers_the_rest_exactly(unit_repository: Path) -> None:
    server = InProcessServer(unit_repository, "--max-message-bytes", "1000000", "--max-inflight-bytes", "1000000",
                             "--max-word-length", "200000")
    word = "hello" * 20_000  # a 100 kB request (its response is 800 kB): about nine fit in the budget

    async def burst() -> list[object]:
        async with AsyncCharRnnClient(server.target, timeout=30, max_message_bytes=2_000_000) as client:
            return await asyncio.gather(*(client.encode("rnn", [word]) for _ in range(32)), return_exceptions=True)

    try:
        outcomes = asyncio.run(burst())
        with CharRnnClient(server.target, timeout=30, max_message_bytes=2_000_000) as client:
            alone = client.encode("rnn", [word])[0]
    finally:
        server.stop()
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    answered = [outcome for outcome in outcomes if isinstance(outcome, list)]
    assert refused and answered, "the burst did not reach the byte budget, or nothing fitted"
    for error in refused:
        assert isinstance(error, CharRnnError) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "REQUEST_BYTES_IN_FLIGHT" and error.retryable and "--max-inflight-bytes" in error.details
    for encodings in answered:
        np.testing.assert_array_equal(encodings[0].outputs, alone.outputs)  # type: ignore[index]


@pytest.mark.unit
def test_a_connection_carries_at_most_max_concurrent_streams_rpcs(unit_repository: Path) -> None:
    server = InProcessServer(unit_repository, "--max-concurrent-streams", "2")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.CharRnnStub(channel)
            held = [HeldStream(stub), HeldStream(stub)]
            with pytest.raises(grpc.RpcError) as raised:
                encode_one(stub, timeout=1.0)  # a third RPC on the connection waits for a free stream
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            held[0].close()
            assert encode_one(stub) == 1  # a stream freed: it goes through
            held[1].close()
    finally:
        server.stop()


@pytest.mark.e2e
def test_max_connection_age_ends_a_long_stream_after_the_grace_and_clients_reconnect(unit_repository: Path) -> None:
    server = InProcessServer(unit_repository, "--max-connection-age-s", "0.5", "--max-connection-age-grace-s", "0.5")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.CharRnnStub(channel)
            held = HeldStream(stub)
            started = time.monotonic()
            error = held.wait_for_end()
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error  # type: ignore[attr-defined]
            assert time.monotonic() - started < 5.0
            assert encode_one(stub) == 1  # the channel reconnects: new calls go through
    finally:
        server.stop()


def connectivity(channel: grpc.Channel) -> list[str]:
    """The channel's connectivity states as they happen (a list that grows)."""
    states: list[str] = []
    channel.subscribe(lambda state: states.append(state.name), try_to_connect=False)
    return states


def wait_until(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


@pytest.mark.e2e
def test_max_connection_idle_closes_a_connection_with_no_rpc(unit_repository: Path) -> None:
    server = InProcessServer(unit_repository, "--max-connection-idle-s", "0.3")
    try:
        with grpc.insecure_channel(server.target) as channel:
            states = connectivity(channel)
            stub = pb_grpc.CharRnnStub(channel)
            assert encode_one(stub) == 1
            assert wait_until(lambda: "READY" in states and states[-1] == "IDLE", 5.0), states  # GOAWAY: idle
            assert encode_one(stub) == 1
    finally:
        server.stop()


@pytest.fixture
def pinging_channel(unit_repository: Path) -> Iterator[tuple[InProcessServer, grpc.Channel]]:
    server = InProcessServer(unit_repository, "--keepalive-min-ping-interval-s", "10")
    options = [("grpc.keepalive_time_ms", 200), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    channel = grpc.insecure_channel(server.target, options=options)
    yield server, channel
    channel.close()
    server.stop()


@pytest.mark.e2e
def test_a_client_pinging_too_often_gets_goaway(pinging_channel: tuple[InProcessServer, grpc.Channel]) -> None:
    _, channel = pinging_channel
    stub = pb_grpc.CharRnnStub(channel)
    held = HeldStream(stub)
    error = held.wait_for_end()  # pings every 200 ms against a 10 s minimum: two strikes, then GOAWAY
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "Too many pings" in (error.details() or "")  # type: ignore[attr-defined]
