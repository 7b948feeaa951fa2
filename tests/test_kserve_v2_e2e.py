"""The Open Inference Protocol on a real charrnn-server subprocess over the torch-exported repository, with the
real tools: tritonclient (sync and asyncio) against charrnn.v1 on the same server, and Triton's perf_analyzer
(clients/bench/perf_analyzer.py) driving ModelInfer with words over the model's alphabet.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from clients.bench.perf_analyzer import PerfAnalyzer, install, run_perf_analyzer
from clients.client import CharRnnClient, State
from clients.processes import ServerProcess
from tests.helpers import LARGE_ALPHABET, LARGE_MODEL

pytestmark = pytest.mark.e2e


def words_input(words: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("WORDS", [len(words)], "BYTES")
    tensor.set_data_from_numpy(np.array(words, dtype=np.object_))
    return tensor


def fp32_input(name: str, values: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    return tensor


@pytest.mark.parametrize("model", ["rnn", "rnn_multi_layers", "lstm", LARGE_MODEL])
def test_infer_equals_charrnn_v1_on_the_exported_models(server: ServerProcess, model: str) -> None:
    alphabet = LARGE_ALPHABET if model == LARGE_MODEL else "helo"
    rng = random.Random(model)
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(33)]
    lstm = model in ("lstm", LARGE_MODEL)
    with triton.InferenceServerClient(server.target) as client, CharRnnClient(server.target) as charrnn:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
        assert client.get_model_metadata(model).name == model
        assert client.get_model_config(model).config.max_batch_size == 4096
        result = client.infer(model, [words_input(words)])
        expected = charrnn.encode(model, words)
        # Continuation: the second halves from the first halves' states, in both protocols.
        halves = [word[: len(word) // 2 or 1] for word in words]
        rests = [word[len(halves[i]):] or "h" for i, word in enumerate(words)]
        first = client.infer(model, [words_input(halves)])
        states = [fp32_input("INITIAL_HIDDEN", first.as_numpy("HIDDEN"))]
        if lstm:
            states.append(fp32_input("INITIAL_CELL", first.as_numpy("CELL")))
        continued = client.infer(model, [words_input(rests), *states])
        expected_continued = charrnn.encode(model, rests, [
            State(first.as_numpy("HIDDEN")[i], first.as_numpy("CELL")[i] if lstm else None) for i in range(len(words))
        ])
    for got, want in ((result, expected), (continued, expected_continued)):
        lengths = got.as_numpy("LENGTHS")
        outputs, hidden, cell = got.as_numpy("OUTPUTS"), got.as_numpy("HIDDEN"), got.as_numpy("CELL")
        for row, encoding in enumerate(want):
            np.testing.assert_array_equal(outputs[row, : lengths[row]], encoding.outputs)
            assert not outputs[row, lengths[row]:].any()
            np.testing.assert_array_equal(hidden[row], encoding.hidden)
            if lstm:
                np.testing.assert_array_equal(cell[row], encoding.cell)
        assert (cell is not None) == lstm


def test_errors_and_the_asyncio_client(server: ServerProcess) -> None:
    with triton.InferenceServerClient(server.target) as client:
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("no_such_model", [words_input(["he"])])
        with pytest.raises(InferenceServerException) as bad:
            client.infer("lstm", [words_input(["hello", "help"])])
    assert unknown.value.status() == "StatusCode.NOT_FOUND" and "no_such_model" in unknown.value.message()
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "word 1 'help'" in bad.value.message() and "'p'" in bad.value.message()

    async def run() -> np.ndarray:
        async with triton_aio.InferenceServerClient(server.target) as client:
            assert await client.is_server_ready()
            tensor = triton_aio.InferInput("WORDS", [2], "BYTES")
            tensor.set_data_from_numpy(np.array(["hello", "he"], dtype=np.object_))
            outputs = [triton_aio.InferRequestedOutput("LENGTHS")]
            result = await client.infer("lstm", [tensor], outputs=outputs)
            assert result.as_numpy("OUTPUTS") is None
            return result.as_numpy("LENGTHS")

    assert asyncio.run(run()).tolist() == [5, 2]


@pytest.fixture(scope="session")
def perf_analyzer(tmp_path_factory: pytest.TempPathFactory) -> PerfAnalyzer:
    """perf_analyzer from the tritonclient 2.41.0 wheel (pip download; needs Debian's libb64-0d, see .ci/run)."""
    folder = tmp_path_factory.mktemp("perf_analyzer")
    return install(folder)


def test_perf_analyzer_drives_model_infer(server: ServerProcess, perf_analyzer: PerfAnalyzer, tmp_path: Path) -> None:
    measured = run_perf_analyzer(perf_analyzer, server.target, "lstm", 2, 4, "helo", tmp_path)
    assert measured["words_per_s"] > 0 and measured["requests_per_s"] * 4 == pytest.approx(measured["words_per_s"])
    assert measured["server_compute_ms"] > 0
    data = json.loads((tmp_path / "words.json").read_text())
    assert all(set(item["WORDS"]["content"][0]) <= set("helo") for item in data["data"])
