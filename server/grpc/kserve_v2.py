"""The Open Inference Protocol (KServe V2 / Triton gRPC) front end: inference.GRPCInferenceService -> Engine calls.

A sibling of charrnn_v1 on the same server and port, over the same Engine, so the same batcher merges requests
of both protocols. Tensors are read and written by kserve_v2_codec; errors become the same rich statuses as
charrnn.v1's (status.py) and are counted into the same metrics (observed.py), which ModelStatistics reads back.

Implemented: ServerLive, ServerReady, ModelReady (readiness is the grpc.health.v1 status of this service, the
one state both report), ServerMetadata, ModelMetadata, ModelInfer, ModelStreamInfer, and Triton's
model_configuration (ModelConfig) and statistics (ModelStatistics) extensions. Every other RPC of the proto
(repository, shared memory, trace, logging) is not registered, so gRPC answers UNIMPLEMENTED.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2

from proto.kserve import grpc_service_pb2 as pb
from proto.kserve import model_config_pb2 as mc
from server.core.admission import ByteBudget
from server.core.batcher import BatchSettings
from server.core.errors import ServiceError, VersionNotFoundError
from server.core.runtime import ModelRuntime
from server.grpc.kserve_v2_codec import (
    CELL,
    HIDDEN,
    INITIAL_CELL,
    INITIAL_HIDDEN,
    LENGTHS,
    OUTPUTS,
    WORDS,
    decode_request,
    encode_response,
    input_specs,
    output_specs,
)
from server.grpc.observed import ANSWERED_VERSION, FrontEnd, admit, in_order
from server.grpc.status import INTERNAL_MESSAGE, status_code
from server.metrics import Metrics

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "charrnn-serving"
EXTENSIONS = ("model_configuration", "statistics")
"""What ServerMetadata advertises: only the extensions implemented here (perf_analyzer reads statistics)."""
PLATFORM = "onnxruntime_onnx"
STREAM_PIPELINE_DEPTH = 4
"""Stream messages a ModelStreamInfer stream may have in flight at once (as charrnn.v1's EncodeStream)."""

Response = TypeVar("Response")


class KServeV2Service(FrontEnd):
    """Translates inference.GRPCInferenceService messages to Engine calls and back."""

    def __init__(self, metrics: Metrics, health_servicer: health.aio.HealthServicer,
                 batching: BatchSettings | None, budget: ByteBudget | None = None) -> None:
        super().__init__(metrics, budget)
        self._health = health_servicer
        self._batching = batching

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        """Live whenever the process answers (also while loading and draining)."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        """Ready exactly when grpc.health.v1 reports this service SERVING."""
        return pb.ServerReadyResponse(ready=await self._serving(context))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        """Ready when the server is, and the model (and version, if given) is loaded."""
        if not await self._serving(context) or self._engine is None:
            return pb.ModelReadyResponse(ready=False)
        try:
            self._model(request.name, request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Name, version and the extensions implemented."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """The model's tensors (kserve_v2_codec.input_specs / output_specs)."""
        return await self._observed("ModelMetadata", request.name, context,
                                    _as_async(lambda: self._metadata(self._model(request.name, request.version))))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        """Triton's model configuration, describing the server's real limits and batching."""
        return await self._observed("ModelConfig", request.name, context, _as_async(
            lambda: pb.ModelConfigResponse(config=self._config(self._model(request.name, request.version)))
        ))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """Per-model totals from the Prometheus metrics (both protocols); an empty name means every model."""

        def statistics() -> pb.ModelStatisticsResponse:
            if request.name:
                names = [self._model(request.name, request.version).name]
            else:
                names = sorted(self.engine.models)
            return pb.ModelStatisticsResponse(model_stats=[self._statistics(name) for name in names])

        return await self._observed("ModelStatistics", request.name, context, _as_async(statistics))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        """Encode the WORDS of one request; any bad word fails the request (INVALID_ARGUMENT naming it)."""
        return await self._observed("ModelInfer", request.model_name, context, lambda: self._infer(request))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; a failed request gets `error_message` and the stream goes on."""
        async with contextlib.aclosing(
            in_order(request_iterator, self._stream_message, STREAM_PIPELINE_DEPTH)
        ) as responses:
            async for response in responses:
                yield response

    async def _stream_message(self, data: bytes) -> pb.ModelStreamInferResponse:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        request = pb.ModelInferRequest()
        ANSWERED_VERSION.set("")
        try:
            request = admit(self.budget, pb.ModelInferRequest, data)
        except ServiceError as error:  # bytes that do not parse, or the byte budget full: this message fails
            self._recorder.record("ModelStreamInfer", "", status_code(error), started)
            return pb.ModelStreamInferResponse(error_message=error.message)
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request))
        except ServiceError as error:
            code = status_code(error)
            message = error.message
        except Exception:
            logger.exception("ModelStreamInfer %s failed", request.model_name)
            code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
        finally:
            self.budget.give(len(data))
            self._recorder.record("ModelStreamInfer", request.model_name, code, started, ANSWERED_VERSION.get())
        return pb.ModelStreamInferResponse(
            error_message=message,
            infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
        )

    async def _observed(
        self, method: str, model: str, context: grpc.aio.ServicerContext, handler: Callable[[], Awaitable[Response]]
    ) -> Response:
        return await self._recorder.observed(method, model, context, handler)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        inputs = decode_request(request, model)
        rows = await self.engine.encode_rows(
            model.name, inputs.words, inputs.states, report_invalid=False, version=model.version
        )
        ANSWERED_VERSION.set(str(rows.model.version))
        words_per_request, queue_seconds = self._recorder.per_model(model.name)
        words_per_request.observe(len(inputs.words))
        if rows.stats is not None:
            queue_seconds.observe(rows.stats.queue_s)
        return encode_response(request, rows, inputs.outputs)

    async def _serving(self, context: grpc.aio.ServicerContext) -> bool:
        answer = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), context)
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def _model(self, name: str, version: str) -> ModelRuntime:
        """The model's default version for an empty `version`, else that loaded version (the protocol's versions
        are strings; ours are the repository's positive integers)."""
        if not version:
            return self.engine.model(name)
        if not version.isdecimal() or int(version) < 1:
            self.engine.model(name)  # an unknown model is MODEL_NOT_FOUND first
            loaded = ", ".join(str(v) for v in sorted(self.engine.served_versions(name))) or "none"
            raise VersionNotFoundError(f"model {name!r} has no version {version[:16]!r} (loaded versions: {loaded})")
        return self.engine.model(name, int(version))

    def _metadata(self, model: ModelRuntime) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[str(v) for v in sorted(self.engine.served_versions(model.name))],
            platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in input_specs(model)],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in output_specs(model)],
        )

    def _config(self, model: ModelRuntime) -> mc.ModelConfig:
        manifest = model.manifest
        state = [manifest.num_layers, manifest.hidden_size]
        no_axis = mc.ModelTensorReshape(shape=[])  # API shape [words, 1] or [words]; the model sees [words]
        inputs = [
            mc.ModelInput(name=WORDS, data_type=mc.TYPE_STRING, dims=[1], reshape=no_axis),
            mc.ModelInput(name=INITIAL_HIDDEN, data_type=mc.TYPE_FP32, dims=state, optional=True),
        ]
        outputs = [
            mc.ModelOutput(name=OUTPUTS, data_type=mc.TYPE_FP32, dims=[-1, manifest.hidden_size]),
            mc.ModelOutput(name=LENGTHS, data_type=mc.TYPE_INT32, dims=[]),  # [words]: one value per word
            mc.ModelOutput(name=HIDDEN, data_type=mc.TYPE_FP32, dims=state),
        ]
        if manifest.has_cell_state:
            inputs.append(mc.ModelInput(name=INITIAL_CELL, data_type=mc.TYPE_FP32, dims=state, optional=True))
            outputs.append(mc.ModelOutput(name=CELL, data_type=mc.TYPE_FP32, dims=state))
        limits = self.engine.limits
        parameters = {
            "kind": manifest.kind,
            "alphabet": manifest.alphabet,
            "num_layers": str(manifest.num_layers),
            "hidden_size": str(manifest.hidden_size),
            "max_word_length": str(limits.max_word_length),
            "execution_provider": model.provider,
            "dynamic_batching": "on" if self._batching is not None else "off",
        }
        if self._batching is not None:
            parameters["max_batch_words"] = str(self._batching.max_batch_words)
            parameters["max_queue_words"] = str(self._batching.max_queue_words)
            parameters["max_queue_gap_ms"] = f"{self._batching.max_gap_s * 1000:g}"
        config = mc.ModelConfig(
            name=model.name, platform=PLATFORM, backend="onnxruntime",
            max_batch_size=limits.max_words,  # words one request may hold (more: RESOURCE_EXHAUSTED)
            input=inputs, output=outputs,
            instance_group=[mc.ModelInstanceGroup(
                kind=mc.ModelInstanceGroup.KIND_GPU if model.provider.startswith("CUDA") else mc.ModelInstanceGroup.KIND_CPU,
                count=1,
            )],
            parameters={key: mc.ModelParameter(string_value=value) for key, value in parameters.items()},
        )
        if self._batching is not None:
            config.dynamic_batching.max_queue_delay_microseconds = round(self._batching.max_delay_s * 1e6)
        return config

    def _statistics(self, name: str) -> pb.ModelStatistics:
        counts = self.metrics.model_counts(name)
        duration = pb.StatisticDuration
        return pb.ModelStatistics(
            name=name, version=str(self.engine.model(name).version),
            last_inference=round(counts.last_run_unix_s * 1000),
            inference_count=counts.words_run,
            execution_count=counts.runs,
            inference_stats=pb.InferStatistics(
                success=duration(count=counts.requests_ok, ns=round(counts.request_seconds * 1e9)),
                fail=duration(count=counts.requests_failed),
                queue=duration(count=counts.queued, ns=round(counts.queue_seconds * 1e9)),
                # One onnxruntime run covers input (one-hot), inference and output, so the run time is all
                # compute_infer; the three counts are the runs (perf_analyzer requires them equal).
                compute_input=duration(count=counts.runs),
                compute_infer=duration(count=counts.runs, ns=round(counts.run_seconds * 1e9)),
                compute_output=duration(count=counts.runs),
            ),
        )


def add_to_server(service: KServeV2Service, server: grpc.aio.Server) -> None:
    """Register the implemented RPCs (the rest of the service answers UNIMPLEMENTED)."""
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def method_handlers(service: KServeV2Service) -> dict[str, grpc.RpcMethodHandler]:
    """Every implemented RPC's handler, by method name, with the response types of the proto. Requests arrive
    as bytes and are parsed by observed.admit() against the byte budget, so bytes that do not parse get
    INVALID_ARGUMENT (MALFORMED_REQUEST) rather than gRPC's UNKNOWN."""
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name in IMPLEMENTED:
        method = methods[name]
        response = getattr(pb, method.output_type.name)
        if method.client_streaming:
            handlers[name] = grpc.stream_stream_rpc_method_handler(
                getattr(service, name), response_serializer=response.SerializeToString
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _admitted(service, name, getattr(pb, method.input_type.name)),
                response_serializer=response.SerializeToString,
            )
    return handlers


def _admitted(service: KServeV2Service, name: str, request_type: type[Any]) -> Callable[..., Awaitable[Any]]:
    """The unary handler `name` of the service, fed the parsed request; refusals are counted and answered."""
    handler = getattr(service, name)

    async def call(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await service.admitted(name, request_type, data, context, lambda request: handler(request, context))

    call.request_type = request_type  # type: ignore[attr-defined]  # what it parses (tests check the proto's)
    return call


IMPLEMENTED = (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelStreamInfer",
    "ModelConfig", "ModelStatistics",
)
"""The RPCs of inference.GRPCInferenceService this front end answers."""


def _version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


def _as_async(function: Callable[[], Response]) -> Callable[[], Awaitable[Response]]:
    async def call() -> Response:
        return function()

    return call
