"""End-to-end parity: words through a real gRPC channel to a real charrnn-server equal eager PyTorch, word by word.

Ground truth is export.trace.eager_word on each word alone, with the eager modules rebuilt independently of the
repository the server loaded (seeded built-ins, the user checkpoint for the large LSTM). Every array the API
returns is compared (outputs, every layer's hidden state, the LSTM cell state) within PARITY_TOLERANCE, through
the raw generated stubs, the blocking client and the asyncio client, for Encode and EncodeStream.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from torch import nn

from clients.client import AsyncCharRnnClient, CharRnnClient, EncodeRequest, Encoding, State, parse_model
from export.manifest import sha256_file
from export.models import BUILTIN_SPECS, load_checkpoint, seeded_model
from export.trace import PARITY_TOLERANCE, eager_word
from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from tests.helpers import CHANNEL_OPTIONS, LARGE_ALPHABET, LARGE_MODEL, ServerProcess, start_server

pytestmark = pytest.mark.e2e

MODELS = ("rnn", "rnn_multi_layers", "lstm", LARGE_MODEL)
FIXED_LENGTHS = (1, 2, 5, 17, 64)


@dataclass(frozen=True)
class Reference:
    """An eager module, rebuilt independently of the server, and its alphabet."""

    module: nn.RNNBase
    alphabet: str

    @property
    def lstm(self) -> bool:
        return isinstance(self.module, nn.LSTM)

    def state_shape(self) -> tuple[int, int]:
        return self.module.num_layers, self.module.hidden_size


@pytest.fixture(scope="module")
def references(large_checkpoint: Path) -> dict[str, Reference]:
    """Eager modules of every served model."""
    refs = {name: Reference(seeded_model(spec).module, spec.alphabet) for name, spec in BUILTIN_SPECS.items()}
    large = load_checkpoint(large_checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET)
    refs[LARGE_MODEL] = Reference(large.module, LARGE_ALPHABET)
    assert sorted(refs) == sorted(MODELS)
    return refs


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    """One raw channel for the module's raw-stub tests."""
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.CharRnnStub:
    return pb_grpc.CharRnnStub(channel)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[CharRnnClient]:
    with CharRnnClient(server.target) as opened:
        yield opened


def random_word(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def mixed_words(rng: random.Random, alphabet: str, extra: int = 4) -> list[str]:
    """Words of lengths 1, 2, 5, 17, 64 and a few random lengths, shuffled."""
    lengths = [*FIXED_LENGTHS, *(rng.randint(1, 40) for _ in range(extra))]
    rng.shuffle(lengths)
    return [random_word(rng, alphabet, length) for length in lengths]


def random_state(
    rng: np.random.Generator, ref: Reference
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    shape = ref.state_shape()
    hidden = rng.uniform(-0.9, 0.9, size=shape).astype(np.float32)
    cell = rng.uniform(-2.0, 2.0, size=shape).astype(np.float32) if ref.lstm else None
    return hidden, cell


def assert_word_matches_eager(
    ref: Reference,
    word: str,
    outputs: npt.NDArray[np.float32],
    hidden: npt.NDArray[np.float32],
    cell: npt.NDArray[np.float32] | None,
    h0: npt.NDArray[np.float32] | None = None,
    c0: npt.NDArray[np.float32] | None = None,
) -> None:
    """The served arrays equal eager PyTorch run on this word alone, within PARITY_TOLERANCE."""
    want = eager_word(ref.module, [ref.alphabet.index(char) for char in word], h0, c0)
    layers, size = ref.state_shape()
    assert outputs.shape == (len(word), size), word
    assert hidden.shape == (layers, size), word
    np.testing.assert_allclose(outputs, want.outputs, rtol=0, atol=PARITY_TOLERANCE, err_msg=f"outputs of {word!r}")
    np.testing.assert_allclose(hidden, want.hidden, rtol=0, atol=PARITY_TOLERANCE, err_msg=f"hidden of {word!r}")
    if ref.lstm:
        assert cell is not None and cell.shape == (layers, size), word
        np.testing.assert_allclose(cell, want.cell, rtol=0, atol=PARITY_TOLERANCE, err_msg=f"cell of {word!r}")
    else:
        assert cell is None or cell.size == 0, word


def arrays_of(result: pb.WordResult, ref: Reference) -> tuple[npt.NDArray[np.float32], ...]:
    """outputs, hidden, cell of a raw WordResult, shaped by the eager module (not by what the server says)."""
    layers, size = ref.state_shape()
    outputs = np.asarray(result.outputs, dtype=np.float32).reshape(result.length, size)
    hidden = np.asarray(result.hidden, dtype=np.float32).reshape(layers, size)
    cell = np.asarray(result.cell, dtype=np.float32)
    return outputs, hidden, (cell.reshape(layers, size) if ref.lstm else cell)


def assert_response_matches_eager(
    response: pb.EncodeResponse,
    model: str,
    words: Sequence[str],
    ref: Reference,
    states: Sequence[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]] | None = None,
) -> None:
    assert response.model == model
    assert (response.num_layers, response.hidden_size) == ref.state_shape()
    assert [result.word for result in response.results] == list(words)
    for index, (word, result) in enumerate(zip(words, response.results, strict=True)):
        assert result.error == ""
        assert result.length == len(word)
        h0, c0 = states[index] if states is not None else (None, None)
        assert_word_matches_eager(ref, word, *arrays_of(result, ref), h0=h0, c0=c0)


def assert_encodings_match_eager(
    encodings: Sequence[Encoding],
    words: Sequence[str],
    ref: Reference,
    states: Sequence[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]] | None = None,
) -> None:
    assert [encoding.word for encoding in encodings] == list(words)
    for index, (word, encoding) in enumerate(zip(words, encodings, strict=True)):
        assert encoding.error == ""
        h0, c0 = states[index] if states is not None else (None, None)
        assert_word_matches_eager(ref, word, encoding.outputs, encoding.hidden, encoding.cell, h0=h0, c0=c0)


def pb_state(hidden: npt.NDArray[np.float32], cell: npt.NDArray[np.float32] | None) -> pb.State:
    return pb.State(hidden=hidden.ravel().tolist(), cell=[] if cell is None else cell.ravel().tolist())


# ---- Encode ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_encode_mixed_lengths_raw_stub(stub: pb_grpc.CharRnnStub, references: dict[str, Reference], model: str) -> None:
    ref = references[model]
    words = mixed_words(random.Random(f"raw-{model}"), ref.alphabet)
    response = stub.Encode(pb.EncodeRequest(model=model, words=words), timeout=30)
    assert_response_matches_eager(response, model, words, ref)
    assert response.timing.total_ms > 0
    assert response.timing.inference_ms > 0
    assert response.timing.queue_ms >= 0


@pytest.mark.parametrize("model", MODELS)
def test_encode_with_initial_states_raw_stub(
    stub: pb_grpc.CharRnnStub, references: dict[str, Reference], model: str
) -> None:
    ref = references[model]
    words = mixed_words(random.Random(f"states-{model}"), ref.alphabet)
    rng = np.random.default_rng(len(model))
    states = [random_state(rng, ref) for _ in words]
    request = pb.EncodeRequest(model=model, words=words, initial_states=[pb_state(h, c) for h, c in states])
    response = stub.Encode(request, timeout=30)
    assert_response_matches_eager(response, model, words, ref, states)


@pytest.mark.parametrize("model", MODELS)
def test_encode_mixed_lengths_blocking_client(
    client: CharRnnClient, references: dict[str, Reference], model: str
) -> None:
    ref = references[model]
    rng = random.Random(f"client-{model}")
    words = mixed_words(rng, ref.alphabet)
    assert_encodings_match_eager(client.encode(model, words), words, ref)
    # With states: some words continue from a given state, the others (None) start from zeros.
    nrng = np.random.default_rng(7)
    states = [random_state(nrng, ref) if index % 2 else None for index in range(len(words))]
    encodings = client.encode(model, words, [None if s is None else State(*s) for s in states])
    assert_encodings_match_eager(encodings, words, ref, [s if s is not None else (None, None) for s in states])


def test_encode_lstm_hidden_only_state_starts_cell_from_zeros(
    client: CharRnnClient, references: dict[str, Reference]
) -> None:
    ref = references["lstm"]
    hidden, _ = random_state(np.random.default_rng(3), ref)
    [encoding] = client.encode("lstm", ["hello"], [State(hidden, None)])
    assert_word_matches_eager(ref, "hello", encoding.outputs, encoding.hidden, encoding.cell, hidden, None)


def test_concurrent_requests_are_each_exact(server: ServerProcess, references: dict[str, Reference]) -> None:
    """Concurrent requests for one model are merged into one batch by the server; each must still be exact."""
    ref = references[LARGE_MODEL]
    requests = []
    for index in range(12):
        rng = random.Random(f"concurrent-{index}")
        words = mixed_words(rng, ref.alphabet, extra=rng.randint(0, 6))
        states = [random_state(np.random.default_rng(index), ref) for _ in words] if index % 3 == 0 else None
        requests.append((words, states))
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(requests))

    def run(words: list[str], states: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]] | None) -> None:
        try:
            with CharRnnClient(server.target) as own:
                own.models()  # connect first, so that the requests really arrive together
                barrier.wait(timeout=30)
                encodings = own.encode(LARGE_MODEL, words, None if states is None else [State(*s) for s in states])
            assert_encodings_match_eager(encodings, words, ref, states)
        except BaseException as error:  # reported below, in the test's thread
            failures.append(error)

    threads = [threading.Thread(target=run, args=request) for request in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[0]


@pytest.mark.parametrize(
    "flags",
    [("--no-batching",), ("--max-queue-delay-ms", "30", "--max-batch-words", "40")],
    ids=["no_batching", "delayed_small_batches"],
)
def test_other_runners_are_exact(
    model_repository: Path, tmp_path: Path, references: dict[str, Reference], flags: tuple[str, ...]
) -> None:
    """Without batching, and with batches that wait for company but split at 40 words, results are the same."""
    running = start_server(model_repository, tmp_path, *flags)
    try:
        jobs = []
        for index, model in enumerate(MODELS * 2):
            ref = references[model]
            words = mixed_words(random.Random(f"runner-{index}"), ref.alphabet, extra=index % 4)
            states = [random_state(np.random.default_rng(index), ref) for _ in words] if index % 2 else None
            jobs.append((model, words, states))

        async def run_all() -> list[list[Encoding]]:
            async with AsyncCharRnnClient(running.target) as aclient:
                return list(
                    await asyncio.gather(
                        *(
                            aclient.encode(model, words, None if states is None else [State(*s) for s in states])
                            for model, words, states in jobs
                        )
                    )
                )

        for (model, words, states), encodings in zip(jobs, asyncio.run(run_all()), strict=True):
            assert_encodings_match_eager(encodings, words, references[model], states)
    finally:
        assert running.stop() == 0, running.log()


# ---- continuation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_continuation_raw_stub(stub: pb_grpc.CharRnnStub, references: dict[str, Reference], model: str) -> None:
    """'hello' in one go equals 'hel', then 'lo' from the state (hidden and cell) returned for 'hel'."""
    ref = references[model]
    whole = stub.Encode(pb.EncodeRequest(model=model, words=["hello"]), timeout=30).results[0]
    head = stub.Encode(pb.EncodeRequest(model=model, words=["hel"]), timeout=30).results[0]
    state = pb.State(hidden=head.hidden, cell=head.cell)
    tail = stub.Encode(pb.EncodeRequest(model=model, words=["lo"], initial_states=[state]), timeout=30).results[0]
    whole_out, whole_h, whole_c = arrays_of(whole, ref)
    head_out, head_h, head_c = arrays_of(head, ref)
    tail_out, tail_h, tail_c = arrays_of(tail, ref)
    tolerance = dict(rtol=0, atol=PARITY_TOLERANCE)
    np.testing.assert_allclose(np.concatenate([head_out, tail_out]), whole_out, **tolerance)
    np.testing.assert_allclose(tail_h, whole_h, **tolerance)
    np.testing.assert_allclose(tail_c, whole_c, **tolerance)
    if ref.lstm:
        assert tail_c.shape == ref.state_shape() and np.abs(tail_c).max() > 0
    # And the continuation itself is exact against eager from the returned state.
    assert_word_matches_eager(ref, "lo", tail_out, tail_h, tail_c, head_h, head_c if ref.lstm else None)
    assert_word_matches_eager(ref, "hello", whole_out, whole_h, whole_c)


@pytest.mark.parametrize("model", MODELS)
def test_continuation_clients(server: ServerProcess, references: dict[str, Reference], model: str) -> None:
    ref = references[model]
    with CharRnnClient(server.target) as sync:
        [whole] = sync.encode(model, ["hello"])
        [head] = sync.encode(model, ["hel"])
        [tail] = sync.encode(model, ["lo"], [head.state])

    async def via_async() -> Encoding:
        async with AsyncCharRnnClient(server.target) as aclient:
            [ahead] = await aclient.encode(model, ["hel"])
            [atail] = await aclient.encode(model, ["lo"], [ahead.state])
            return atail

    async_tail = asyncio.run(via_async())
    for continued in (tail, async_tail):
        np.testing.assert_allclose(continued.outputs, whole.outputs[3:], rtol=0, atol=PARITY_TOLERANCE)
        np.testing.assert_allclose(continued.hidden, whole.hidden, rtol=0, atol=PARITY_TOLERANCE)
        if ref.lstm:
            assert continued.cell is not None and whole.cell is not None
            np.testing.assert_allclose(continued.cell, whole.cell, rtol=0, atol=PARITY_TOLERANCE)
        else:
            assert continued.cell is None and whole.cell is None


# ---- asyncio client ---------------------------------------------------------------------------------------------


def test_async_client_parity_concurrently(server: ServerProcess, references: dict[str, Reference]) -> None:
    jobs = []
    for index, model in enumerate(MODELS * 3):
        ref = references[model]
        words = mixed_words(random.Random(f"async-{index}"), ref.alphabet)
        states = [random_state(np.random.default_rng(index), ref) for _ in words] if index % 2 else None
        jobs.append((model, words, states))

    async def run_all() -> tuple[list[list[Encoding]], str, list[str]]:
        async with AsyncCharRnnClient(server.target) as aclient:
            results = await asyncio.gather(
                *(
                    aclient.encode(model, words, None if states is None else [State(*s) for s in states])
                    for model, words, states in jobs
                )
            )
            return list(results), await aclient.health(), [m.name for m in await aclient.models()]

    results, health, names = asyncio.run(run_all())
    assert health == "SERVING"
    assert names == sorted(MODELS)
    for (model, words, states), encodings in zip(jobs, results, strict=True):
        assert_encodings_match_eager(encodings, words, references[model], states)


# ---- EncodeStream -------------------------------------------------------------------------------------------------


def stream_plan(references: dict[str, Reference], messages: int) -> list[tuple[str, list[str]]]:
    """Many messages over every model; a few heavy ones among light ones, so that they finish out of order."""
    rng = random.Random("stream")
    plan = []
    for index in range(messages):
        model = MODELS[index % len(MODELS)]
        alphabet = references[model].alphabet
        if model == LARGE_MODEL and index % 8 == 3:
            words = [random_word(rng, alphabet, 64) for _ in range(150)]  # heavy: overtaken by the next ones
        else:
            words = [random_word(rng, alphabet, rng.randint(1, 20)) for _ in range(rng.randint(1, 4))]
        plan.append((model, words))
    return plan


def check_stream_responses(
    plan: list[tuple[str, list[str]]], responses: list[pb.EncodeResponse], references: dict[str, Reference]
) -> None:
    assert len(responses) == len(plan)
    for (model, words), response in zip(plan, responses, strict=True):
        ref = references[model]
        if len(words) > 10:  # heavy messages: check order and a sample of words (keeps eager time down)
            assert response.model == model and [r.word for r in response.results] == words
            for word, result in list(zip(words, response.results))[:: 37]:
                assert_word_matches_eager(ref, word, *arrays_of(result, ref))
        else:
            assert_response_matches_eager(response, model, words, ref)


def test_encode_stream_raw_stub_keeps_order_and_parity(
    stub: pb_grpc.CharRnnStub, references: dict[str, Reference]
) -> None:
    plan = stream_plan(references, messages=96)
    requests = (pb.EncodeRequest(model=model, words=words) for model, words in plan)
    responses = list(stub.EncodeStream(requests, timeout=120))
    check_stream_responses(plan, responses, references)


def test_encode_stream_blocking_client(client: CharRnnClient, references: dict[str, Reference]) -> None:
    plan = stream_plan(references, messages=40)
    rng = np.random.default_rng(11)
    states_plan = []
    requests = []
    for model, words in plan:
        ref = references[model]
        states = [random_state(rng, ref) for _ in words] if len(words) <= 10 else None
        states_plan.append(states)
        requests.append(EncodeRequest(model, words, None if states is None else [State(*s) for s in states]))
    answers = list(client.encode_stream(iter(requests)))
    assert len(answers) == len(plan)
    for (model, words), states, encodings in zip(plan, states_plan, answers, strict=True):
        if states is None:
            assert [encoding.word for encoding in encodings] == words
        else:
            assert_encodings_match_eager(encodings, words, references[model], states)


def test_stream_and_unary_give_the_same_numbers(stub: pb_grpc.CharRnnStub, references: dict[str, Reference]) -> None:
    for model in MODELS:
        words = mixed_words(random.Random(f"same-{model}"), references[model].alphabet)
        unary = stub.Encode(pb.EncodeRequest(model=model, words=words), timeout=30)
        [streamed] = list(stub.EncodeStream(iter([pb.EncodeRequest(model=model, words=words)]), timeout=30))
        for a, b in zip(unary.results, streamed.results, strict=True):
            assert a.word == b.word and a.length == b.length
            np.testing.assert_allclose(a.outputs, b.outputs, rtol=0, atol=PARITY_TOLERANCE)
            np.testing.assert_allclose(a.hidden, b.hidden, rtol=0, atol=PARITY_TOLERANCE)
            np.testing.assert_allclose(a.cell, b.cell, rtol=0, atol=PARITY_TOLERANCE)


# ---- metadata -----------------------------------------------------------------------------------------------------


def test_list_and_get_model_metadata(
    stub: pb_grpc.CharRnnStub, client: CharRnnClient, model_repository: Path, references: dict[str, Reference]
) -> None:
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert [m.name for m in listed] == sorted(MODELS)
    assert [m.name for m in client.models()] == sorted(MODELS)
    for metadata in listed:
        ref = references[metadata.name]
        assert metadata.kind == ("lstm" if ref.lstm else "rnn")
        assert metadata.input_size == len(ref.alphabet) == ref.module.input_size
        assert (metadata.num_layers, metadata.hidden_size) == ref.state_shape()
        assert metadata.alphabet == ref.alphabet
        assert metadata.nonlinearity == ("" if ref.lstm else "tanh")
        assert metadata.execution_provider == "CPUExecutionProvider"
        assert metadata.max_word_length == 256
        folder = model_repository / metadata.name / "1"
        assert dict(metadata.artifact_sha256) == {
            "model.onnx": sha256_file(folder / "model.onnx"),
            "model.pt": sha256_file(folder / "model.pt"),
        }
        assert stub.GetModel(pb.GetModelRequest(name=metadata.name), timeout=10) == metadata
        assert client.model(metadata.name) == parse_model(metadata)
