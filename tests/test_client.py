"""The client library (clients/client.py) against a real charrnn-server.

Numbers against eager PyTorch, states, asyncio, timeouts, typed errors and their reasons, streams (sync and
asyncio). What errors mean without a server, and gRPC's retries: tests/test_client_errors.py.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from clients.client import (
    DEFAULT_TIMEOUT_S,
    AsyncCharRnnClient,
    CharRnnClient,
    CharRnnError,
    DeadlineExceededError,
    EncodeRequest,
    Encoding,
    InvalidArgumentError,
    ModelInfo,
    ModelNotFoundError,
    ResourceExhaustedError,
    State,
    build_request,
)
from export.models import BUILTIN_ALPHABET, BUILTIN_SPECS, load_checkpoint, seeded_model
from export.trace import PARITY_TOLERANCE, WordResult, eager_word
from tests.helpers import LARGE_ALPHABET, LARGE_MODEL, ServerProcess

pytestmark = pytest.mark.e2e

FloatArray = npt.NDArray[np.float32]

# Mixed lengths in one request: each word must come out exactly as if encoded alone.
# About 0.2 s of server work (500 words of 256 characters); TINY_TIMEOUT_S is far shorter.
SLOW_WORDS = ["hello" * 51 + "h"] * 500
TINY_TIMEOUT_S = 0.01

WORDS = ["h", "he", "hello", "olleh", "l", "hellohellohellohello", "leo", "oooooooooooooooooooooooooooooooooooooooo"]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[CharRnnClient]:
    """A blocking client on the session's server."""
    with CharRnnClient(server.target) as connected:
        yield connected


@pytest.fixture(scope="module")
def modules(large_checkpoint: Path) -> dict[str, nn.RNNBase]:
    """The eager PyTorch module behind each served model."""
    eager = {name: seeded_model(spec).module for name, spec in BUILTIN_SPECS.items()}
    large = load_checkpoint(large_checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET)
    eager[LARGE_MODEL] = large.module
    return eager


def alphabet_of(model: str) -> str:
    """The letters of a served model, in one-hot order."""
    return LARGE_ALPHABET if model == LARGE_MODEL else BUILTIN_ALPHABET


def eager(module: nn.RNNBase, model: str, word: str, state: State | None = None) -> WordResult:
    """Eager PyTorch's result for one word, optionally from a starting state."""
    indices = [alphabet_of(model).index(char) for char in word]
    if state is None:
        return eager_word(module, indices)
    return eager_word(module, indices, state.hidden, state.cell)


def assert_close(actual: FloatArray, expected: FloatArray, what: str) -> None:
    """Same shape, and equal within the project's parity tolerance."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PARITY_TOLERANCE, err_msg=what)


def assert_matches(encoding: Encoding, expected: WordResult, what: str) -> None:
    """An Encoding equals an eager result: outputs, hidden, and cell (present iff LSTM)."""
    assert not encoding.error, f"{what}: unexpected error {encoding.error}"
    assert_close(encoding.outputs, expected.outputs, f"{what} outputs")
    assert_close(encoding.hidden, expected.hidden, f"{what} hidden")
    if expected.cell is None:
        assert encoding.cell is None, f"{what}: a cell state for a model without one"
    else:
        assert encoding.cell is not None, f"{what}: no cell state from an LSTM"
        assert_close(encoding.cell, expected.cell, f"{what} cell")


def assert_same(actual: Encoding, expected: Encoding, what: str) -> None:
    """Two server answers for the same word agree (they may come from different batches)."""
    assert actual.word == expected.word, what
    assert actual.error == expected.error, what
    assert_close(actual.outputs, expected.outputs, f"{what} outputs")
    assert_close(actual.hidden, expected.hidden, f"{what} hidden")
    assert (actual.cell is None) == (expected.cell is None), what
    if expected.cell is not None:
        assert actual.cell is not None
        assert_close(actual.cell, expected.cell, f"{what} cell")


def requests_total(server: ServerProcess, method: str, model: str, code: str) -> float:
    """charrnn_requests_total{method, model, version, code} from the server's Prometheus endpoint (0 if never
    counted); the version is the one that answered: 1 for an OK answer here, none for an error."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "charrnn_requests_total" and sample.labels == {
                "method": method, "model": model, "version": "1" if code == "OK" else "", "code": code,
            }:
                return sample.value
    return 0.0


# ---- numbers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [*BUILTIN_SPECS, LARGE_MODEL])
def test_encode_equals_eager_pytorch(client: CharRnnClient, modules: dict[str, nn.RNNBase], model: str) -> None:
    words = WORDS if model != LARGE_MODEL else [*WORDS, "Hello-World0123", "zZ-3", LARGE_ALPHABET]
    encodings = client.encode(model, words)
    assert [encoding.word for encoding in encodings] == words
    module = modules[model]
    for encoding, word in zip(encodings, words, strict=True):
        assert encoding.outputs.shape == (len(word), module.hidden_size)
        assert encoding.hidden.shape == (module.num_layers, module.hidden_size)
        assert encoding.outputs.dtype == np.float32
        assert_matches(encoding, eager(module, model, word), f"{model} {word!r}")


def test_to_json_shape(client: CharRnnClient) -> None:
    lstm = client.encode("lstm", ["hel"])[0].to_json()
    assert set(lstm) == {"word", "version", "outputs", "hidden", "cell"} and lstm["version"] == 1
    assert lstm["word"] == "hel"
    assert len(lstm["outputs"]) == 3 and all(len(row) == 2 for row in lstm["outputs"])
    assert len(lstm["hidden"]) == 3 and len(lstm["cell"]) == 3
    rnn = client.encode("rnn", ["hel"])[0].to_json()
    assert set(rnn) == {"word", "version", "outputs", "hidden"}
    assert len(rnn["hidden"]) == 1


def test_report_invalid_encodes_good_words_and_names_bad_ones(client: CharRnnClient) -> None:
    encodings = client.encode("rnn", ["hel", "hexo", "", "lo"], report_invalid=True)
    assert [encoding.word for encoding in encodings] == ["hel", "hexo", "", "lo"]
    assert not encodings[0].error and not encodings[3].error
    assert encodings[0].outputs.shape == (3, 2) and encodings[3].outputs.shape == (2, 2)
    assert "'x'" in encodings[1].error and "position 2" in encodings[1].error
    assert "empty" in encodings[2].error
    assert encodings[1].to_json() == {"word": "hexo", "error": encodings[1].error}


def test_health_and_metadata(client: CharRnnClient, modules: dict[str, nn.RNNBase]) -> None:
    assert client.health() == "SERVING"
    assert client.health("charrnn.v1.CharRnn") == "SERVING"
    models = client.models()
    assert [model.name for model in models] == sorted([*BUILTIN_SPECS, LARGE_MODEL])
    for metadata in models:
        assert isinstance(metadata, ModelInfo)  # the library's own value, not a protobuf message
        module = modules[metadata.name]
        lstm = isinstance(module, nn.LSTM)
        assert metadata.kind == ("lstm" if lstm else "rnn")
        assert (metadata.input_size, metadata.hidden_size, metadata.num_layers) == (
            module.input_size, module.hidden_size, module.num_layers,
        )
        assert metadata.state_shape == (module.num_layers, module.hidden_size)
        assert metadata.nonlinearity == (None if lstm else "tanh")
        assert metadata.alphabet == alphabet_of(metadata.name)
        assert metadata.execution_provider == "CPUExecutionProvider"  # the fixture runs --device cpu
        assert metadata.max_word_length == 256
        assert type(metadata.artifact_sha256) is dict and set(metadata.artifact_sha256) == {"model.onnx", "model.pt"}
        assert all(len(digest) == 64 for digest in metadata.artifact_sha256.values())
        assert client.model(metadata.name) == metadata
    record = models[0].to_json()
    assert list(record) == [
        "name", "kind", "input_size", "hidden_size", "num_layers", "nonlinearity", "alphabet",
        "execution_provider", "max_word_length", "artifact_sha256", "version", "versions",
    ]
    assert record["version"] == 1
    assert record["versions"] == [{"version": 1, "state": "ready", "error": "", "default": True}]
    assert list(record["artifact_sha256"]) == ["model.onnx", "model.pt"]


# ---- states ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["rnn", "rnn_multi_layers", "lstm", LARGE_MODEL])
def test_state_continuation_equals_the_whole_word(
    client: CharRnnClient, modules: dict[str, nn.RNNBase], model: str
) -> None:
    head, tail = ("hel", "lo") if model != LARGE_MODEL else ("Hello-", "World")
    whole = client.encode(model, [head + tail])[0]
    first = client.encode(model, [head])[0]
    second = client.encode(model, [tail], [first.state])[0]
    assert_close(second.outputs, whole.outputs[len(head):], "continued outputs")
    assert_close(second.hidden, whole.hidden, "continued hidden")
    if whole.cell is not None:
        assert second.cell is not None
        assert_close(second.cell, whole.cell, "continued cell")
    assert_matches(second, eager(modules[model], model, tail, first.state), "continuation vs eager")


@pytest.mark.parametrize("model", ["rnn_multi_layers", "lstm"])
def test_none_state_starts_from_zeros(client: CharRnnClient, modules: dict[str, nn.RNNBase], model: str) -> None:
    first = client.encode(model, ["hel"])[0]
    continued, fresh, again = client.encode(model, ["lo", "lo", "eh"], [first.state, None, first.state])
    module = modules[model]
    assert_matches(continued, eager(module, model, "lo", first.state), "continued")
    assert_matches(fresh, eager(module, model, "lo"), "fresh (None state)")
    assert_matches(again, eager(module, model, "eh", first.state), "continued")
    assert not np.allclose(continued.hidden, fresh.hidden), "the state made no difference: the test proves nothing"
    only_none = client.encode(model, ["lo"], [None])[0]
    assert_same(only_none, fresh, "a list of only None")


def test_explicit_state_values(client: CharRnnClient, modules: dict[str, nn.RNNBase]) -> None:
    rng = np.random.default_rng(7)
    state = State(rng.uniform(-1, 1, (3, 2)).astype(np.float32), rng.uniform(-1, 1, (3, 2)).astype(np.float32))
    encoding = client.encode("lstm", ["hello"], [state])[0]
    assert_matches(encoding, eager(modules["lstm"], "lstm", "hello", state), "lstm from a random state")


def test_bad_states(client: CharRnnClient) -> None:
    with pytest.raises(ValueError, match="1 states for 2 words"):
        client.encode("rnn", ["he", "lo"], [None])
    with pytest.raises(InvalidArgumentError) as wrong_size:
        client.encode("rnn_multi_layers", ["he"], [State(np.zeros((1, 2), np.float32))])
    assert "initial hidden state has 2 values" in wrong_size.value.details
    assert wrong_size.value.reason == "INVALID_STATE"
    with pytest.raises(InvalidArgumentError) as cell_for_rnn:
        client.encode("rnn", ["he"], [State(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32))])
    assert "no cell state" in cell_for_rnn.value.details


# ---- asyncio ---------------------------------------------------------------------------------------------------


def test_async_client(server: ServerProcess, client: CharRnnClient, modules: dict[str, nn.RNNBase]) -> None:
    async def scenario() -> tuple[str, list[str], list[list[Encoding]], list[Encoding], CharRnnError]:
        async with AsyncCharRnnClient(server.target) as aclient:
            status = await aclient.health()
            infos = await aclient.models()
            assert all(isinstance(info, ModelInfo) for info in infos)
            assert await aclient.model("lstm") == next(info for info in infos if info.name == "lstm")
            names = [info.name for info in infos]
            # Concurrent calls (the server may batch them together) each get their own words back.
            batches = await asyncio.gather(*(aclient.encode("lstm", [word, word[::-1]]) for word in WORDS))
            first = (await aclient.encode("rnn_multi_layers", ["hel"]))[0]
            continued = await aclient.encode("rnn_multi_layers", ["lo", "lo"], [first.state, None])
            try:
                await aclient.model("no_such_model")
            except CharRnnError as error:
                missing = error
            else:
                raise AssertionError("GetModel of an unknown model succeeded")
            return status, names, batches, continued, missing

    status, names, batches, continued, missing = asyncio.run(scenario())
    assert status == "SERVING"
    assert names == [model.name for model in client.models()]
    for word, batch in zip(WORDS, batches, strict=True):
        assert [encoding.word for encoding in batch] == [word, word[::-1]]
        assert_matches(batch[0], eager(modules["lstm"], "lstm", word), f"async {word!r}")
        assert_matches(batch[1], eager(modules["lstm"], "lstm", word[::-1]), f"async {word[::-1]!r}")
    head = client.encode("rnn_multi_layers", ["hel"])[0]
    multi = modules["rnn_multi_layers"]
    assert_matches(continued[0], eager(multi, "rnn_multi_layers", "lo", head.state), "async continued")
    assert_matches(continued[1], eager(multi, "rnn_multi_layers", "lo"), "async None state")
    assert isinstance(missing, ModelNotFoundError)
    assert missing.code == grpc.StatusCode.NOT_FOUND and "no_such_model" in missing.details
    assert missing.reason == "MODEL_NOT_FOUND"


def test_async_timeouts_and_errors(server: ServerProcess) -> None:
    async def scenario() -> tuple[CharRnnError | None, list[Encoding], CharRnnError | None]:
        async with AsyncCharRnnClient(server.target, timeout=TINY_TIMEOUT_S) as aclient:
            deadline: CharRnnError | None = None
            try:
                await aclient.encode("lstm", SLOW_WORDS)  # the client's tiny default timeout
            except CharRnnError as error:
                deadline = error
            encoded = await aclient.encode("rnn", ["hel"], timeout=30)  # the per-call timeout wins
            bad_word: CharRnnError | None = None
            try:
                await aclient.encode("rnn", ["hex"], timeout=30)
            except CharRnnError as error:
                bad_word = error
        return deadline, encoded, bad_word

    deadline, encoded, bad_word = asyncio.run(scenario())
    assert isinstance(deadline, DeadlineExceededError) and deadline.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [encoding.word for encoding in encoded] == ["hel"] and encoded[0].outputs.shape == (3, 2)
    assert isinstance(bad_word, InvalidArgumentError) and bad_word.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in bad_word.details
    assert bad_word.reason == "WORD_NOT_IN_ALPHABET" and bad_word.info.metadata == {"word_index": "0", "position": "2"}
    assert deadline.reason is None  # the client's own deadline: nothing from the server


# ---- timeouts --------------------------------------------------------------------------------------------------


def test_default_timeout_applies_and_per_call_timeout_overrides(server: ServerProcess) -> None:
    # gRPC does not reliably enforce sub-millisecond deadlines on fast localhost calls (the reply can beat the
    # deadline timer), so the "tiny" timeout is 10 ms on a request that takes the server well over 100 ms.
    with CharRnnClient(server.target) as default:
        assert default.timeout == DEFAULT_TIMEOUT_S
        assert len(default.encode("lstm", SLOW_WORDS)) == len(SLOW_WORDS)  # fits in the default 10 s
        with pytest.raises(DeadlineExceededError) as tiny:
            default.encode("lstm", SLOW_WORDS, timeout=TINY_TIMEOUT_S)
        assert tiny.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert tiny.value.details
    with CharRnnClient(server.target, timeout=TINY_TIMEOUT_S) as impatient:
        assert impatient.timeout == TINY_TIMEOUT_S
        with pytest.raises(DeadlineExceededError):  # the client's default is used when the call gives none
            impatient.encode("lstm", SLOW_WORDS)
        assert len(impatient.encode("lstm", SLOW_WORDS, timeout=60)) == len(SLOW_WORDS)  # the per-call value wins
        assert impatient.health(timeout=30) == "SERVING"


# ---- typed errors ----------------------------------------------------------------------------------------------


def test_typed_errors_carry_code_and_details(client: CharRnnClient) -> None:
    with pytest.raises(InvalidArgumentError) as bad_char:
        client.encode("lstm", ["hello", "hexo"])
    assert bad_char.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_char.value.details == "word 1 'hexo': character 'x' at position 2 is not in the model's alphabet 'helo'"
    assert str(bad_char.value) == f"INVALID_ARGUMENT: {bad_char.value.details}"
    assert bad_char.value.reason == "WORD_NOT_IN_ALPHABET"
    assert bad_char.value.info.metadata == {"word_index": "1", "position": "2"}
    assert not bad_char.value.retryable

    with pytest.raises(InvalidArgumentError) as empty:
        client.encode("rnn", [""])
    assert "word 0 ''" in empty.value.details and "empty" in empty.value.details
    assert empty.value.reason == "WORD_EMPTY" and empty.value.info.metadata == {"word_index": "0"}

    with pytest.raises(InvalidArgumentError) as too_long:
        client.encode("rnn", ["h" * 257])
    assert "257 characters" in too_long.value.details and "256" in too_long.value.details
    assert too_long.value.reason == "WORD_TOO_LONG"

    with pytest.raises(InvalidArgumentError) as no_words:
        client.encode("rnn", [])
    assert "no words" in no_words.value.details
    assert no_words.value.reason == "NO_WORDS"

    with pytest.raises(ModelNotFoundError) as missing:
        client.encode("no_such_model", ["hello"])
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert "'no_such_model'" in missing.value.details and "lstm" in missing.value.details
    assert missing.value.reason == "MODEL_NOT_FOUND" and not missing.value.retryable

    with pytest.raises(ResourceExhaustedError) as too_many:
        client.encode("rnn", ["h"] * 4097)
    assert too_many.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "4097" in too_many.value.details
    assert too_many.value.reason == "TOO_MANY_WORDS" and not too_many.value.retryable

    for error in (bad_char.value, missing.value, too_many.value):
        assert isinstance(error, CharRnnError)


# ---- retries ---------------------------------------------------------------------------------------------------


def settled_requests_total(server: ServerProcess, method: str, model: str, code: str, expected: float) -> float:
    """The counter once it has reached `expected` (or after 10 s), then again after a pause for stragglers.

    The server counts a failed RPC just after its status is sent, so a scrape right after the call can miss it.
    """
    deadline = time.monotonic() + 10
    while requests_total(server, method, model, code) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # a retry, had there been one, would have been counted by now
    return requests_total(server, method, model, code)


def test_invalid_argument_is_not_retried_by_the_real_server(client: CharRnnClient, server: ServerProcess) -> None:
    assert server.metrics_port is not None
    before_bad = requests_total(server, "Encode", "rnn", "INVALID_ARGUMENT")
    before_ok = requests_total(server, "Encode", "rnn", "OK")
    with pytest.raises(InvalidArgumentError):
        client.encode("rnn", ["hexo"])
    assert settled_requests_total(server, "Encode", "rnn", "INVALID_ARGUMENT", before_bad + 1) == before_bad + 1
    client.encode("rnn", ["hello"])
    assert settled_requests_total(server, "Encode", "rnn", "OK", before_ok + 1) == before_ok + 1


# ---- streaming -------------------------------------------------------------------------------------------------


def stream_plan(count: int, seed: int) -> list[EncodeRequest]:
    """Random requests over the built-in models: mixed lengths, some with states (None among them), some bad words."""
    rng = random.Random(seed)
    models = ["rnn", "lstm", "rnn_multi_layers"]
    layers = {"rnn": 1, "lstm": 3, "rnn_multi_layers": 3}
    plan = []
    for index in range(count):
        model = models[index % len(models)]
        words = ["".join(rng.choices(BUILTIN_ALPHABET, k=rng.randint(1, 30))) for _ in range(rng.randint(1, 12))]
        if index % 7 == 3:
            words[0] = words[0][:1] + "x" + words[0][1:]  # reported in its own Encoding, the others encoded
        states: list[State | None] | None = None
        if index % 5 == 1:
            states = [
                None if rng.random() < 0.3 else State(
                    np.asarray([rng.uniform(-1, 1) for _ in range(layers[model] * 2)], np.float32).reshape(-1, 2),
                    np.zeros((3, 2), np.float32) if model == "lstm" else None,
                )
                for _ in words
            ]
        plan.append(EncodeRequest(model, words, states))
    return plan


def assert_stream_answers(plan: list[EncodeRequest], responses: list[list[Encoding]]) -> None:
    """One response per request, in order, each with its words in order and the right shapes."""
    assert len(responses) == len(plan)
    for index, (request, encodings) in enumerate(zip(plan, responses, strict=True)):
        assert [encoding.word for encoding in encodings] == list(request.words), f"response {index} is out of order"
        for encoding, word in zip(encodings, request.words, strict=True):
            if "x" in word:
                assert "'x'" in encoding.error and encoding.outputs.shape == (0, 2)
                continue
            assert encoding.outputs.shape == (len(word), 2) and not encoding.error
            assert (encoding.cell is not None) == (request.model == "lstm")


def test_encode_stream_keeps_order_over_many_requests(client: CharRnnClient) -> None:
    plan = stream_plan(300, seed=42)
    responses = list(client.encode_stream(iter(plan)))
    assert_stream_answers(plan, responses)
    # Spot-check the numbers of a few responses (states among them) against unary calls.
    for index in (0, 1, 2, 6, 150, 299):
        request = plan[index]
        expected = client.encode(request.model, request.words, request.states, report_invalid=True)
        for got, want in zip(responses[index], expected, strict=True):
            assert_same(got, want, f"stream response {index}")


def test_async_encode_stream_equals_the_sync_one(server: ServerProcess, client: CharRnnClient) -> None:
    plan = stream_plan(120, seed=7)

    async def produce() -> AsyncIterator[EncodeRequest]:
        for request in plan:
            await asyncio.sleep(0)
            yield request

    async def scenario() -> tuple[list[list[Encoding]], list[list[Encoding]]]:
        async with AsyncCharRnnClient(server.target) as aclient:
            from_list = [encodings async for encodings in aclient.encode_stream(plan)]
            from_async = [encodings async for encodings in aclient.encode_stream(produce(), timeout=60)]
        return from_list, from_async

    from_list, from_async = asyncio.run(scenario())
    expected = list(client.encode_stream(plan))
    assert_stream_answers(plan, expected)
    for answers in (from_list, from_async):
        assert len(answers) == len(expected)
        for index, (got, want) in enumerate(zip(answers, expected, strict=True)):
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                assert_same(a, b, f"async stream response {index}")


def test_encode_stream_reports_bad_words_and_fails_on_unknown_model(client: CharRnnClient) -> None:
    responses = list(client.encode_stream([EncodeRequest("rnn", ["hel", "hexo"]), EncodeRequest("lstm", ["lo"])]))
    assert [[encoding.word for encoding in response] for response in responses] == [["hel", "hexo"], ["lo"]]
    assert not responses[0][0].error and "'x'" in responses[0][1].error
    received: list[list[str]] = []
    with pytest.raises(ModelNotFoundError) as missing:
        for encodings in client.encode_stream([EncodeRequest("rnn", ["hel"]), EncodeRequest("no_such_model", ["hel"])]):
            received.append([encoding.word for encoding in encodings])
    assert received == [["hel"]]
    assert "no_such_model" in missing.value.details and missing.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as rejected:  # report_invalid=False: the first bad word ends the stream
        list(client.encode_stream([EncodeRequest("rnn", ["hexo"], report_invalid=False)]))
    assert rejected.value.reason == "WORD_NOT_IN_ALPHABET"


def test_async_encode_stream_errors(server: ServerProcess) -> None:
    async def scenario() -> tuple[list[list[str]], CharRnnError]:
        received: list[list[str]] = []
        async with AsyncCharRnnClient(server.target) as aclient:
            try:
                async for encodings in aclient.encode_stream(
                    [EncodeRequest("rnn", ["hel", "hexo"]), EncodeRequest("no_such_model", ["hel"])]
                ):
                    received.append([encoding.error or encoding.word for encoding in encodings])
            except CharRnnError as error:
                return received, error
        raise AssertionError("the stream of an unknown model succeeded")

    received, error = asyncio.run(scenario())
    assert len(received) == 1 and received[0][0] == "hel" and "'x'" in received[0][1]
    assert isinstance(error, ModelNotFoundError) and error.reason == "MODEL_NOT_FOUND"


def test_encode_stream_raises_the_callers_own_exception(server: ServerProcess, client: CharRnnClient) -> None:
    # An exception while producing the requests (the caller's iterator, or states that do not fit) ends the
    # stream: the requests sent before it are answered, then the exception itself is raised, not a gRPC error.
    def failing() -> Iterator[EncodeRequest]:
        yield EncodeRequest("rnn", ["hel"])
        yield EncodeRequest("lstm", ["lo"], [None])  # a None state: the client looks the model's shape up
        raise RuntimeError("no more words")

    received: list[list[str]] = []
    with pytest.raises(RuntimeError, match="no more words"):
        for encodings in client.encode_stream(failing()):
            received.append([encoding.word for encoding in encodings])
    assert received == [["hel"], ["lo"]]
    with pytest.raises(ValueError, match="1 states for 2 words"):
        list(client.encode_stream([EncodeRequest("rnn", ["he", "lo"], [None])]))
    with pytest.raises(TypeError, match="EncodeRequest values, not proto.charrnn.v1.charrnn_pb2.EncodeRequest"):  # a protobuf message
        list(client.encode_stream([build_request("rnn", ["he"])]))  # type: ignore[list-item]

    async def produce() -> AsyncIterator[EncodeRequest]:
        yield EncodeRequest("rnn", ["hel"])
        raise RuntimeError("no more words")

    async def scenario() -> list[list[str]]:
        got: list[list[str]] = []
        async with AsyncCharRnnClient(server.target) as aclient:
            with pytest.raises(RuntimeError, match="no more words"):
                async for encodings in aclient.encode_stream(produce(), timeout=30):
                    got.append([encoding.word for encoding in encodings])
            with pytest.raises(ModelNotFoundError):  # the None state's shape lookup failed
                async for _ in aclient.encode_stream([EncodeRequest("no_such_model", ["he"], [None])], timeout=30):
                    pass
            assert (await aclient.encode("rnn", ["lo"]))[0].word == "lo"  # the channel still serves
        return got

    assert asyncio.run(scenario()) == [["hel"]]
