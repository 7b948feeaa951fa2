"""The Open Inference Protocol front end, called with tritonclient (sync, asyncio, streaming) and raw stubs on an
in-process server over the torch-free unit repository: health and metadata, ModelConfig, ModelInfer results
exactly equal to charrnn.v1's for the same words, requested outputs, errors, statistics from the metrics.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from tritonclient.utils import InferenceServerException

from clients.client import CharRnnClient, State
from clients.errors import CharRnnError, error_from_rpc
from proto.kserve import grpc_service_pb2 as pb
from proto.kserve import grpc_service_pb2_grpc as pb_grpc
from server.grpc import kserve_v2
from tests.helpers import InProcessServer

pytestmark = pytest.mark.unit

MIXED = ["h", "hello", "hel", "olleh", "eh"]


@pytest.fixture(scope="module")
def served(unit_repository: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(unit_repository, "--max-queue-delay-ms", "2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def triton_client(served: InProcessServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(served.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def charrnn(served: InProcessServer) -> Iterator[CharRnnClient]:
    with CharRnnClient(served.target) as client:
        yield client


@pytest.fixture(scope="module")
def stub(served: InProcessServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def words_input(words: list[str], shape: list[int] | None = None) -> triton.InferInput:
    tensor = triton.InferInput("WORDS", shape or [len(words)], "BYTES")
    tensor.set_data_from_numpy(np.array([w.encode() for w in words], dtype=np.object_).reshape(shape or [len(words)]))
    return tensor


def state_input(name: str, values: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(values.shape), "FP32")
    tensor.set_data_from_numpy(values.astype(np.float32))
    return tensor


def assert_equals_charrnn(result: Any, expected: list[Any], lstm: bool) -> None:
    """Every output tensor (as_numpy) holds exactly charrnn.v1's per-word results."""
    outputs, lengths, hidden = result.as_numpy("OUTPUTS"), result.as_numpy("LENGTHS"), result.as_numpy("HIDDEN")
    assert lengths.dtype == np.int32 and lengths.tolist() == [len(e.word) for e in expected]
    assert outputs.dtype == np.float32 and outputs.shape == (len(expected), max(lengths), expected[0].outputs.shape[1])
    for row, encoding in enumerate(expected):
        np.testing.assert_array_equal(outputs[row, : lengths[row]], encoding.outputs)
        assert not outputs[row, lengths[row]:].any(), "zero past the word's end"
        np.testing.assert_array_equal(hidden[row], encoding.hidden)
    cell = result.as_numpy("CELL")
    if lstm:
        for row, encoding in enumerate(expected):
            np.testing.assert_array_equal(cell[row], encoding.cell)
    else:
        assert cell is None


def test_live_ready_and_server_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("lstm") and triton_client.is_model_ready("lstm", "1")
    assert not triton_client.is_model_ready("no_such_model") and not triton_client.is_model_ready("lstm", "2")
    metadata = triton_client.get_server_metadata()
    assert metadata.name == "charrnn-serving" and metadata.version
    assert list(metadata.extensions) == ["model_configuration", "statistics"]


def test_model_metadata_names_every_tensor(triton_client: triton.InferenceServerClient) -> None:
    lstm = triton_client.get_model_metadata("lstm", as_json=True)
    assert lstm["versions"] == ["1"] and lstm["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in lstm["inputs"]] == [
        ("WORDS", "BYTES", ["-1", "1"]), ("INITIAL_HIDDEN", "FP32", ["-1", "3", "2"]), ("INITIAL_CELL", "FP32", ["-1", "3", "2"]),
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in lstm["outputs"]] == [
        ("OUTPUTS", "FP32", ["-1", "-1", "2"]), ("LENGTHS", "INT32", ["-1"]), ("HIDDEN", "FP32", ["-1", "3", "2"]),
        ("CELL", "FP32", ["-1", "3", "2"]),
    ]
    gru = triton_client.get_model_metadata("gru")
    assert [t.name for t in gru.inputs] == ["WORDS", "INITIAL_HIDDEN"]
    assert [t.name for t in gru.outputs] == ["OUTPUTS", "LENGTHS", "HIDDEN"]


def test_model_config_is_the_servers_real_limits(triton_client: triton.InferenceServerClient, served: InProcessServer) -> None:
    config = triton_client.get_model_config("lstm").config
    assert config.name == "lstm" and config.max_batch_size == served.config.max_words
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [
        ("WORDS", [1], False), ("INITIAL_HIDDEN", [3, 2], True), ("INITIAL_CELL", [3, 2], True),
    ]
    assert config.input[0].HasField("reshape") and list(config.input[0].reshape.shape) == []
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("OUTPUTS", [-1, 2]), ("LENGTHS", []), ("HIDDEN", [3, 2]), ("CELL", [3, 2]),
    ]
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["alphabet"] == "helo" and parameters["kind"] == "lstm"
    assert parameters["max_batch_words"] == str(served.config.max_batch_words)
    assert parameters["max_queue_gap_ms"] == f"{served.config.max_queue_gap_ms:g}"
    assert parameters["execution_provider"] == "CPUExecutionProvider"


def test_model_config_without_batching_has_no_dynamic_batching(unit_repository: Path) -> None:
    server = InProcessServer(unit_repository, "--no-batching")
    try:
        with triton.InferenceServerClient(server.target) as client:
            config = client.get_model_config("rnn").config
        assert not config.HasField("dynamic_batching")
        assert config.parameters["dynamic_batching"].string_value == "off"
    finally:
        server.stop()


@pytest.mark.parametrize("model", ["lstm", "rnn_multi_layers", "gru", "rnn"])
def test_infer_equals_charrnn_v1_for_mixed_lengths(
    triton_client: triton.InferenceServerClient, charrnn: CharRnnClient, model: str
) -> None:
    result = triton_client.infer(model, [words_input(MIXED)])
    assert_equals_charrnn(result, charrnn.encode(model, MIXED), lstm=model == "lstm")


def test_words_may_have_a_per_item_shape_of_one(triton_client: triton.InferenceServerClient, charrnn: CharRnnClient) -> None:
    result = triton_client.infer("lstm", [words_input(MIXED, [len(MIXED), 1])])
    assert_equals_charrnn(result, charrnn.encode("lstm", MIXED), lstm=True)


def test_continuation_with_initial_states_equals_charrnn_v1(
    triton_client: triton.InferenceServerClient, charrnn: CharRnnClient
) -> None:
    first = triton_client.infer("lstm", [words_input(["hel", "he"])])
    hidden, cell = first.as_numpy("HIDDEN"), first.as_numpy("CELL")
    result = triton_client.infer("lstm", [
        words_input(["lo", "llo"]), state_input("INITIAL_HIDDEN", hidden), state_input("INITIAL_CELL", cell),
    ])
    expected = charrnn.encode("lstm", ["lo", "llo"], [State(hidden[0], cell[0]), State(hidden[1], cell[1])])
    assert_equals_charrnn(result, expected, lstm=True)
    whole = charrnn.encode("lstm", ["hello"])[0]
    np.testing.assert_allclose(result.as_numpy("HIDDEN")[0], whole.hidden, atol=1e-6)
    # A hidden state alone (an LSTM's cell then starts at zero), as charrnn.v1 does.
    alone = triton_client.infer("rnn_multi_layers", [words_input(["lo"]), state_input("INITIAL_HIDDEN", np.ones((1, 3, 2)))])
    expected = charrnn.encode("rnn_multi_layers", ["lo"], [State(np.ones((3, 2), dtype=np.float32))])
    assert_equals_charrnn(alone, expected, lstm=False)


def test_requested_outputs_only_and_parameters_tolerated(triton_client: triton.InferenceServerClient) -> None:
    result = triton_client.infer(
        "lstm", [words_input(["hello", "he"])],
        outputs=[triton.InferRequestedOutput("HIDDEN"), triton.InferRequestedOutput("LENGTHS")],
        request_id="request-7", sequence_id=42, priority=1, timeout=1_000_000,
    )
    response = result.get_response()
    assert response.id == "request-7" and response.model_name == "lstm" and response.model_version == "1"
    assert [output.name for output in response.outputs] == ["HIDDEN", "LENGTHS"]
    assert result.as_numpy("OUTPUTS") is None and result.as_numpy("CELL") is None
    assert result.as_numpy("LENGTHS").tolist() == [5, 2] and result.as_numpy("HIDDEN").shape == (2, 3, 2)


def test_typed_contents_give_the_same_results_as_raw(
    stub: pb_grpc.GRPCInferenceServiceStub, triton_client: triton.InferenceServerClient
) -> None:
    states = np.linspace(-1, 1, 2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    request = pb.ModelInferRequest(model_name="lstm", id="typed")
    request.inputs.add(name="WORDS", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"hel", b"lo"])
    request.inputs.add(name="INITIAL_HIDDEN", datatype="FP32", shape=[2, 3, 2]).contents.fp32_contents.extend(states.ravel())
    typed = stub.ModelInfer(request, timeout=10)
    raw = triton_client.infer("lstm", [words_input(["hel", "lo"]), state_input("INITIAL_HIDDEN", states)])
    assert typed.id == "typed" and len(typed.raw_output_contents) == 4
    assert list(typed.raw_output_contents) == list(raw.get_response().raw_output_contents)


def triton_error(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_unknown_model_is_not_found(triton_client: triton.InferenceServerClient, charrnn: CharRnnClient) -> None:
    error = triton_error(lambda: triton_client.infer("no_such_model", [words_input(["he"])]))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "'no_such_model' is not loaded" in error.message() and "lstm" in error.message()
    assert triton_error(lambda: triton_client.get_model_metadata("no_such_model")).status() == "StatusCode.NOT_FOUND"
    assert triton_error(lambda: triton_client.get_model_config("lstm", "2")).status() == "StatusCode.NOT_FOUND"


def test_bad_word_is_invalid_argument_with_charrnn_v1s_message_and_reason(
    triton_client: triton.InferenceServerClient, charrnn: CharRnnClient, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    error = triton_error(lambda: triton_client.infer("rnn", [words_input(["hel", "hexo"])]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(CharRnnError) as domain:
        charrnn.encode("rnn", ["hel", "hexo"])
    assert error.message() == domain.value.details
    assert "word 1 'hexo'" in error.message() and "'x'" in error.message() and "position 2" in error.message()
    request = pb.ModelInferRequest(model_name="rnn")
    request.inputs.add(name="WORDS", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hexo")
    with pytest.raises(grpc.RpcError) as raw:
        stub.ModelInfer(request, timeout=10)
    details = rpc_status.from_call(raw.value).details
    info = error_details_pb2.ErrorInfo()
    details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "WORD_NOT_IN_ALPHABET", "charrnn.v1", {"word_index": "0", "position": "2"}
    )


@pytest.mark.parametrize("mutate, code, fragment", [
    (lambda r: r.inputs[0].ClearField("datatype"), "INVALID_ARGUMENT", "expected BYTES"),
    (lambda r: r.inputs[0].shape.extend([2]), "INVALID_ARGUMENT", "expected [words] or [words, 1]"),
    (lambda r: r.inputs.add(name="PIXELS", datatype="FP32", shape=[1]), "INVALID_ARGUMENT", "unknown input 'PIXELS'"),
    (lambda r: r.inputs.add(name="INITIAL_HIDDEN", datatype="FP32", shape=[1, 3, 2]), "INVALID_ARGUMENT",
     "expected [words, num_layers, hidden] = [2, 3, 2]"),
    (lambda r: r.inputs.add(name="INITIAL_CELL", datatype="FP32", shape=[2, 1, 2]).contents.fp32_contents.extend([0.0] * 4),
     "INVALID_ARGUMENT", "unknown input 'INITIAL_CELL'"),
    (lambda r: r.outputs.add(name="CELL"), "INVALID_ARGUMENT", "unknown output 'CELL'"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 3), "INVALID_ARGUMENT", "holds 2 strings"),
    (lambda r: r.ClearField("inputs"), "INVALID_ARGUMENT", "no WORDS input"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 0) or r.inputs[0].contents.ClearField("bytes_contents"),
     "INVALID_ARGUMENT", "no words"),
    (lambda r: setattr(r, "model_version", "3"), "NOT_FOUND", "no version 3 loaded (loaded versions: 1)"),
        (lambda r: setattr(r, "model_version", "v1"), "NOT_FOUND", "no version 'v1' (loaded versions: 1)"),
])
def test_malformed_requests_are_named(stub: pb_grpc.GRPCInferenceServiceStub, mutate: Any, code: str, fragment: str) -> None:
    request = pb.ModelInferRequest(model_name="rnn_multi_layers")
    request.inputs.add(name="WORDS", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"he", b"lo"])
    mutate(request)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    assert caught.value.code().name == code and fragment in caught.value.details(), caught.value.details()


def test_raw_bytes_are_length_prefixed(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="rnn")
    request.inputs.add(name="WORDS", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(b"\x02\x00\x00\x00he\x09\x00\x00\x00lo")
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "element 1 says 9 bytes, but only 2 are left" in caught.value.details()
    request.raw_input_contents[0] = b"\x02\x00\x00\x00he\x02\x00\x00\x00lo"
    assert stub.ModelInfer(request, timeout=10).outputs[1].shape == [2]


def test_stream_infer_answers_each_request_and_reports_errors_in_the_stream(
    triton_client: triton.InferenceServerClient, charrnn: CharRnnClient
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        triton_client.async_stream_infer("lstm", [words_input(MIXED)], request_id="a")
        triton_client.async_stream_infer("lstm", [words_input(["hexo"])], request_id="b")
        triton_client.async_stream_infer("gru", [words_input(["olé"])], request_id="c")
        triton_client.async_stream_infer("gru", [words_input(["hello"])], request_id="d")
        received = [answers.get(timeout=10) for _ in range(4)]
    finally:
        triton_client.stop_stream()
    assert_equals_charrnn(received[0][0], charrnn.encode("lstm", MIXED), lstm=True)
    assert received[0][0].get_response().id == "a"
    assert received[1][0] is None and "word 0 'hexo'" in received[1][1].message()
    assert received[2][0] is None and "'é'" in received[2][1].message()
    assert_equals_charrnn(received[3][0], charrnn.encode("gru", ["hello"]), lstm=False)


def test_the_asyncio_client(served: InProcessServer, charrnn: CharRnnClient) -> None:
    async def run() -> tuple[bool, bool, Any, Any]:
        async with triton_aio.InferenceServerClient(served.target) as client:
            tensor = triton_aio.InferInput("WORDS", [len(MIXED)], "BYTES")
            tensor.set_data_from_numpy(np.array(MIXED, dtype=np.object_))
            results = await asyncio.gather(*(client.infer("lstm", [tensor]) for _ in range(8)))
            config = await client.get_model_config("lstm")
            return await client.is_server_ready(), await client.is_model_ready("lstm"), results, config

    ready, model_ready, results, config = asyncio.run(run())
    assert ready and model_ready and config.config.max_batch_size > 0
    expected = charrnn.encode("lstm", MIXED)
    for result in results:
        assert_equals_charrnn(result, expected, lstm=True)


def test_statistics_are_the_prometheus_metrics(served: InProcessServer, triton_client: triton.InferenceServerClient,
                                               charrnn: CharRnnClient) -> None:
    triton_client.infer("rnn", [words_input(["he", "hello"])])
    charrnn.encode("rnn", ["lo"])  # the other protocol counts too: one engine, one set of counters
    with pytest.raises(InferenceServerException):
        triton_client.infer("rnn", [words_input(["x"])])
    stats = triton_client.get_inference_statistics("rnn").model_stats[0]
    registry = served.running.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    ok = sum(sample("charrnn_requests_total", method=m, model="rnn", version="1", code="OK")
             for m in ("Encode", "ModelInfer"))
    assert stats.name == "rnn" and stats.version == "1"
    assert stats.inference_count == sample("charrnn_batch_words_sum", model="rnn") >= 3
    assert stats.execution_count == sample("charrnn_inference_seconds_count", model="rnn") >= 2
    assert stats.inference_stats.success.count == ok >= 2
    assert stats.inference_stats.fail.count >= 1
    assert stats.inference_stats.compute_infer.ns == round(sample("charrnn_inference_seconds_sum", model="rnn") * 1e9)
    assert stats.inference_stats.queue.count == sample("charrnn_queue_wait_seconds_count", model="rnn")
    assert stats.last_inference > 1_600_000_000_000
    every = triton_client.get_inference_statistics().model_stats
    assert sorted(s.name for s in every) == sorted(served.running.engine.models)


def test_readiness_is_the_health_status_and_other_rpcs_are_unimplemented(
    served: InProcessServer, triton_client: triton.InferenceServerClient, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    health = served.running.health
    served.call(health.set(kserve_v2.SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING))
    try:
        assert triton_client.is_server_live()
        assert not triton_client.is_server_ready() and not triton_client.is_model_ready("lstm")
    finally:
        served.call(health.set(kserve_v2.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING))
    assert triton_client.is_server_ready()
    with pytest.raises(grpc.RpcError) as caught:
        stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_lists_the_service(served: InProcessServer) -> None:
    with grpc.insecure_channel(served.target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {service.name for service in next(answers).list_services_response.service}
    assert {"inference.GRPCInferenceService", "charrnn.v1.CharRnn", "grpc.health.v1.Health"} <= services


def test_every_implemented_rpc_is_registered_with_the_protos_types() -> None:
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    handlers = kserve_v2.method_handlers(kserve_v2.KServeV2Service.__new__(kserve_v2.KServeV2Service))
    assert set(handlers) == set(kserve_v2.IMPLEMENTED) and set(kserve_v2.IMPLEMENTED) <= set(methods)
    for name, handler in handlers.items():
        assert handler.request_deserializer is None, name  # bytes in: parsed by observed.admit()
        if not methods[name].client_streaming:
            assert handler.unary_unary.request_type is getattr(pb, methods[name].input_type.name), name
        assert handler.request_streaming == methods[name].client_streaming, name


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady"])
@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x02\xc3\x28"], ids=["garbage", "cut-short", "bad-utf8"])
def test_request_bytes_that_do_not_parse_get_invalid_argument(served: InProcessServer, method: str, data: bytes) -> None:
    with grpc.insecure_channel(served.target) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            call(data, timeout=10)
        error = error_from_rpc(caught.value)
        expected = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[method].input_type.full_name
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
        assert error.details == f"request is not a valid {expected}"
    assert served.running.engine is not None  # and the server goes on:
    with grpc.insecure_channel(served.target) as channel:
        ready = pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=10)
        assert ready.ready


def test_a_stream_message_that_does_not_parse_gets_an_error_message_and_the_stream_goes_on(
    served: InProcessServer,
) -> None:
    good = pb.ModelInferRequest(model_name="rnn", id="good")
    good.inputs.add(name="WORDS", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"he")
    with grpc.insecure_channel(served.target) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda data: data, response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        responses = list(call(iter([b"\xff\xff", good.SerializeToString()]), timeout=10))
    assert responses[0].error_message == "request is not a valid inference.ModelInferRequest"
    assert responses[1].error_message == "" and responses[1].infer_response.id == "good"
    assert responses[1].infer_response.model_version == "1"
