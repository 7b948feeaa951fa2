"""Dynamic batching against eager PyTorch: the exported models, merged traffic, a real server under a burst.

The unit tests (tests/test_batcher.py) prove batching exact against each request alone on torch-free models;
these prove the served numbers equal eager PyTorch (export.trace.eager_word on each word alone, to
PARITY_TOLERANCE) on the models charrnn-export really writes, batched and over a real server.
"""

from __future__ import annotations

import asyncio
import random
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from clients.client import AsyncCharRnnClient, ResourceExhaustedError, State, build_request, parse_response
from export.models import BUILTIN_SPECS, load_checkpoint, seeded_model
from export.trace import PARITY_TOLERANCE, eager_word
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from server.core.batcher import BatchSettings
from server.core.engine import Engine, InitialState, Limits, WordEncoding
from server.core.runtime import ModelRuntime, load_repository
from tests.helpers import CHANNEL_OPTIONS, LARGE_ALPHABET, LARGE_MODEL, start_server
from tests.test_batcher import Recorder, encode_all, max_error, random_traffic

pytestmark = pytest.mark.e2e

MODELS = ("rnn", "rnn_multi_layers", "lstm", LARGE_MODEL)
LIMITS = Limits(max_words=4096, max_word_length=256)


@pytest.fixture(scope="module")
def runtimes(model_repository: Path) -> dict[str, ModelRuntime]:
    return load_repository(model_repository, "cpu")


@pytest.fixture(scope="module")
def modules(large_checkpoint: Path) -> dict[str, nn.RNNBase]:
    """The eager modules, rebuilt independently of the repository."""
    built = {name: seeded_model(spec).module for name, spec in BUILTIN_SPECS.items()}
    built[LARGE_MODEL] = load_checkpoint(
        large_checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET
    ).module
    return built


def eager(module: nn.RNNBase, runtime: ModelRuntime, word: str, state: InitialState | None) -> WordEncoding:
    indices = [runtime.manifest.alphabet.index(char) for char in word]
    result = eager_word(module, indices, None if state is None else state.hidden, None if state is None else state.cell)
    return WordEncoding(word, result.outputs, result.hidden, result.cell)


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_equals_unbatched_equals_eager_on_concurrent_mixed_traffic(
    runtimes: dict[str, ModelRuntime], modules: dict[str, nn.RNNBase], seed: int
) -> None:
    requests = random_traffic(runtimes, seed, count=80, models=MODELS)
    recorder = Recorder()
    batched = asyncio.run(
        encode_all(Engine(runtimes, LIMITS, BatchSettings(max_batch_words=64, max_delay_s=0.0, max_queue_words=65536), observer=recorder), requests)
    )
    unbatched = asyncio.run(encode_all(Engine(runtimes, LIMITS, None), requests))
    largest = max(len(r.words) for r in requests)
    assert max(words for _, words in recorder.runs) > largest, "concurrent requests were never merged"
    for request, merged, alone in zip(requests, batched, unbatched, strict=True):
        assert len(merged.words) == len(alone.words) == len(request.words)
        runtime, module = runtimes[request.model], modules[request.model]
        for index, (a, b) in enumerate(zip(merged.words, alone.words, strict=True)):
            assert isinstance(a, WordEncoding) and isinstance(b, WordEncoding)
            assert max_error(a, b) <= PARITY_TOLERANCE
            state = request.states[index] if request.states else None
            assert max_error(a, eager(module, runtime, request.words[index], state)) <= PARITY_TOLERANCE


@pytest.mark.parametrize("inline_max_us", ["0", "500"])
def test_two_workers_answer_concurrent_mixed_traffic_exactly_as_eager(
    model_repository: Path, tmp_path: Path, runtimes: dict[str, ModelRuntime], modules: dict[str, nn.RNNBase],
    inline_max_us: str,
) -> None:
    """--workers 2, batching on: the same mixed traffic over 8 connections of their own (spread over both workers
    by SO_REUSEPORT), every word equal to eager PyTorch alone, with runs on onnxruntime's thread and inline; and,
    on the thread, the runs did merge requests."""
    requests = random_traffic(runtimes, 7, count=120, models=MODELS)
    # A 20 ms wait so that requests from several connections meet; the whole of it (gap 0), since on a loaded
    # machine they may arrive more than the default 1 ms gap apart.
    server = start_server(model_repository, tmp_path, "--workers", "2", "--max-batch-words", "64",
                          "--max-queue-delay-ms", "20", "--max-queue-gap-ms", "0", "--inline-max-us", inline_max_us)

    async def send_all() -> list[list[object]]:
        channels = [grpc.aio.insecure_channel(server.target, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(8)]
        try:
            calls = [
                pb_grpc.CharRnnStub(channels[index % len(channels)]).Encode(
                    build_request(r.model, r.words, [State(s.hidden, s.cell) for s in r.states] or None), timeout=60
                )
                for index, r in enumerate(requests)
            ]
            return [parse_response(response) for response in await asyncio.gather(*calls)]
        finally:
            for channel in channels:
                await channel.close()

    try:
        answers = asyncio.run(send_all())
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
            samples: dict[str, float] = {}
            for family in text_string_to_metric_families(reply.read().decode()):
                for sample in family.samples:
                    if family.name == "charrnn_batch_words" and "le" not in sample.labels:  # summed over models
                        samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    finally:
        assert server.stop() == 0, server.log()
    for request, encodings in zip(requests, answers, strict=True):
        runtime, module = runtimes[request.model], modules[request.model]
        for index, encoding in enumerate(encodings):
            state = request.states[index] if request.states else None
            got = WordEncoding(encoding.word, encoding.outputs, encoding.hidden, encoding.cell)  # type: ignore[attr-defined]
            assert max_error(got, eager(module, runtime, request.words[index], state)) <= PARITY_TOLERANCE
    # Runs summed over both workers: every word of every request ...
    assert samples["charrnn_batch_words_sum"] == sum(len(r.words) for r in requests)
    if inline_max_us == "0":
        # ... in fewer runs than requests (merged): while a run is on onnxruntime's thread the model is busy, and
        # what arrives meanwhile waits for company. Not asserted with inline runs: a request that reaches an idle
        # worker is answered within its own event-loop turn, and grpc.aio hands a worker one call per turn, so
        # whether two ever meet is a matter of timing (a CI run saw 120 runs for 120 requests).
        assert samples["charrnn_batch_words_count"] < len(requests), samples
    log = server.log()
    assert "[worker 0] server.main: serving" in log and "[worker 1] server.main: serving" in log


def test_a_burst_against_a_small_queue_gets_some_resource_exhausted_and_the_rest_exact(
    model_repository: Path, tmp_path: Path, modules: dict[str, nn.RNNBase], runtimes: dict[str, ModelRuntime]
) -> None:
    server = start_server(model_repository, tmp_path, "--max-queue-words", "8", "--max-batch-words", "8")
    rng = random.Random(3)
    runtime, module = runtimes[LARGE_MODEL], modules[LARGE_MODEL]
    requests = [
        ["".join(rng.choice(LARGE_ALPHABET) for _ in range(rng.randint(20, 40))) for _ in range(4)]
        for _ in range(120)
    ]

    async def burst() -> list[list[object] | BaseException]:
        async with AsyncCharRnnClient(server.target, timeout=60) as client:
            return await asyncio.gather(
                *(client.encode(LARGE_MODEL, words) for words in requests), return_exceptions=True
            )

    try:
        outcomes = asyncio.run(burst())
    finally:
        assert server.stop() == 0, server.log()
    rejected = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert rejected, "a burst of 120 requests never filled a queue of 8 words"
    assert all(isinstance(error, ResourceExhaustedError) and error.reason == "QUEUE_FULL" and error.retryable
               for error in rejected)
    answered = [(words, outcome) for words, outcome in zip(requests, outcomes, strict=True) if isinstance(outcome, list)]
    assert answered, "every request was rejected"
    for words, encodings in answered:
        for word, encoding in zip(words, encodings, strict=True):
            expected = eager(module, runtime, word, None)
            got = WordEncoding(encoding.word, encoding.outputs, encoding.hidden, encoding.cell)  # type: ignore[attr-defined]
            assert max_error(got, expected) <= PARITY_TOLERANCE
