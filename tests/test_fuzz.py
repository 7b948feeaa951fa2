"""Hostile input, bounded: random and malformed requests over every charrnn.v1 RPC of a real server on 127.0.0.1.

Each case must get a status from the client-error set (never UNKNOWN or INTERNAL); afterwards a good request
gets a result bit-identical to before, the process's RSS stays bounded, and the server leaves no task or
thread behind. The run stops by itself after MAX_CASES cases or TIME_BUDGET_S seconds, whichever comes first;
it dials only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from proto.charrnn.v1 import charrnn_pb2 as pb
from tests.helpers import InProcessServer

pytestmark = pytest.mark.e2e

MAX_CASES = 600
TIME_BUDGET_S = 20.0
CLIENT_ERRORS = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
NASTY = ["\x00", "\U0001f600", "\u202e", "e\u0301", "\ud7ff", "\n", "h", "e", "l", "o", "\ufeff", "/", "..", "%s"]


def nasty_word(rng: random.Random) -> str:
    return "".join(rng.choice(NASTY) for _ in range(rng.randint(0, 12)))


def encode_case(rng: random.Random) -> bytes:
    """An EncodeRequest that is valid protobuf but hostile in content, or bytes that are not protobuf at all."""
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 200))
    if kind == 1:  # invalid UTF-8 in the model string
        return b"\x0a\x04\xc3\x28\xff\xfe"
    if kind == 2:  # a packed float field cut mid-float
        good = pb.EncodeRequest(model="lstm", words=["he"], initial_states=[pb.State(hidden=[0.0] * 6)])
        return good.SerializeToString()[:-2]
    request = pb.EncodeRequest(model=rng.choice(["lstm", "rnn", "../../etc/passwd", "", "x" * 5000, "gru\x00"]))
    if kind == 3:
        request.words.extend(nasty_word(rng) for _ in range(rng.randint(0, 20)))
    elif kind == 4:  # huge repeated field: more than --max-words
        request.words.extend(["hel"] * rng.choice([65, 5000]))
    elif kind == 5:  # states of the wrong size, or NaN/inf in them
        request.words.extend(["hel", "lo"])
        size = rng.choice([0, 1, 5, 6, 7, 1000])
        value = rng.choice([0.1, float("nan"), float("inf"), -float("inf")])
        request.initial_states.extend(pb.State(hidden=[value] * size, cell=[value] * rng.choice([0, size]))
                                      for _ in range(rng.choice([1, 2, 3])))
    elif kind == 6:
        request.words.extend(["h" * rng.choice([257, 100_000])])
    else:
        request.words.extend(["hello", "hel"])
        request.invalid_words = rng.choice([0, 1, 2])
    data = request.SerializeToString()
    if kind == 7:  # an unknown field, and an unknown enum value
        data += b"\xf8\x06\x2a" + b"\x20\x4d"
    return data


@pytest.fixture
def server(unit_repository: Path) -> Iterator[InProcessServer]:
    running = InProcessServer(unit_repository, "--max-words", "64", "--max-message-bytes", str(1 << 20),
                              "--max-inflight-bytes", str(4 << 20))
    yield running
    running.stop()


def good_result(channel: grpc.Channel) -> bytes:
    """A good request's response bytes, less the timing (which differs per call): the floats, bit for bit."""
    request = pb.EncodeRequest(model="lstm", words=["hello", "hel", "o"]).SerializeToString()
    response = pb.EncodeResponse.FromString(channel.unary_unary("/charrnn.v1.CharRnn/Encode")(request, timeout=10))
    response.ClearField("timing")
    return response.SerializeToString()


def test_fuzz_every_rpc_gets_a_client_error_and_the_server_stays_exact_and_bounded(server: InProcessServer) -> None:
    rng = random.Random(20241204)
    process = psutil.Process()
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 1 << 22)]) as channel:
        before = good_result(channel)
        threads_before = threading.active_count()
        tasks_before = server.call(_task_count())
        rss_before = process.memory_info().rss
        encode = channel.unary_unary("/charrnn.v1.CharRnn/Encode")
        stream = channel.stream_stream("/charrnn.v1.CharRnn/EncodeStream")
        get_model = channel.unary_unary("/charrnn.v1.CharRnn/GetModel")
        list_models = channel.unary_unary("/charrnn.v1.CharRnn/ListModels")
        seen: dict[str, int] = {}
        cases = 0
        deadline = time.monotonic() + TIME_BUDGET_S

        def check(call: Callable[[], object], what: str) -> None:
            try:
                call()
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                assert code in CLIENT_ERRORS, f"{what}: {code.name}: {error.details()}"
                assert len(error.details() or "") < 2000, what
            seen[code.name] = seen.get(code.name, 0) + 1

        while cases < MAX_CASES and time.monotonic() < deadline:
            cases += 1
            data = encode_case(rng)
            choice = rng.randrange(6)
            if choice <= 1:
                check(lambda: encode(data, timeout=10), "Encode")
            elif choice == 2:
                check(lambda: list(stream(iter([data, encode_case(rng)]), timeout=10)), "EncodeStream")
            elif choice == 3:
                check(lambda: get_model(rng.choice([data, pb.GetModelRequest(name=nasty_word(rng)).SerializeToString()]),
                                        timeout=10), "GetModel")
                check(lambda: list_models(rng.randbytes(rng.randint(0, 8)), timeout=10), "ListModels")
            elif choice == 4:  # a stream abandoned half-way
                requests = iter([pb.EncodeRequest(model="lstm", words=["hello"] * 50).SerializeToString()] * 100)
                call = stream(requests, timeout=10)
                next(call)
                call.cancel()
            else:  # a client that disconnects mid-response
                future = encode.future(pb.EncodeRequest(model="lstm", words=["hello" * 50] * 64).SerializeToString(),
                                       timeout=10)
                time.sleep(rng.random() * 0.002)
                future.cancel()
        assert good_result(channel) == before  # bit-identical after everything
    assert cases >= 100, f"only {cases} cases ran"
    assert seen.get("INVALID_ARGUMENT", 0) > 0 and seen.get("OK", 0) > 0, seen
    assert process.memory_info().rss - rss_before < 300 * 1024 * 1024
    time.sleep(0.5)  # let cancelled calls finish on the server
    tasks_after = server.call(_task_count())
    assert tasks_after <= tasks_before, f"{tasks_after - tasks_before} task(s) left behind on the server's loop"
    assert threading.active_count() <= threads_before + 2
    assert server.running.engine is not None


async def _task_count() -> int:
    """Tasks on the server's loop besides this one (grpc's own serving tasks included, the same before and after)."""
    await asyncio.sleep(0.2)
    return len(asyncio.all_tasks()) - 1
