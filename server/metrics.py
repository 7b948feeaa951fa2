"""Prometheus metrics: requests by model, version and code, per-stage latency, words per request, batch size,
provider and version lifecycle.

Counters and gauges carry the model's version; the histograms stay per model (each histogram series is a
dozen-odd buckets, so a version label would multiply them by every version ever served).

They are also the source of the Open Inference Protocol's ModelStatistics: model_counts() reads one model's
totals back from the same registry, so /metrics and ModelStatistics can never disagree.

With --workers N (server/supervisor.py) every worker runs in prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor before a worker starts): each process writes its values to
files there, the supervisor serves their sum on the one metrics port (multiprocess_registry()), and
model_counts() reads that same sum, so ModelStatistics reports the whole server (every worker, dead ones'
counts included) whichever worker answers it, and still agrees with /metrics.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
"""Set (by the supervisor) in a worker's environment: its metrics go to files there, summed over workers."""

INFERENCE_METHODS = ("Encode", "EncodeStream", "ModelInfer", "ModelStreamInfer")
"""The RPCs (method label) that run a model, in both protocols: what a model's request counts add up."""

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WORD_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Metrics:
    """The service's metrics, in a registry of their own (several servers can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        multiprocess_dir = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
        self.totals = self.registry if multiprocess_dir is None else multiprocess_registry(multiprocess_dir)
        """Where model_counts() reads: this registry alone, or with workers the sum over every worker."""
        self._shown: set[tuple[str, str, str]] = set()
        self._shown_defaults: set[str] = set()
        self._run_children: dict[str, tuple[Any, Any, Any]] = {}
        """observe_run's metric children by model: labels() is a locked lookup per call, this a dict get."""
        self.requests = Counter(
            "charrnn_requests", "RPCs handled, by method, model, the version that answered and gRPC status code.",
            ["method", "model", "version", "code"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            "charrnn_request_seconds", "End-to-end server time of an RPC (a stream counts per message).",
            ["method", "model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "charrnn_queue_wait_seconds", "Time a request waited for its batch to start.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "charrnn_inference_seconds", "onnxruntime run time of one batch.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.words_per_request = Histogram(
            "charrnn_words_per_request", "Words in one request.",
            ["model"], buckets=_WORD_BUCKETS, registry=self.registry,
        )
        self.batch_words = Histogram(
            "charrnn_batch_words", "Words in one onnxruntime run (after dynamic batching).",
            ["model"], buckets=_WORD_BUCKETS, registry=self.registry,
        )
        self.client_requests = Counter(
            "charrnn_client_requests", "RPCs by authenticated client name (with --auth-token-file), and those "
            "denied for a missing or wrong token (client \"\"). Names only, never tokens.",
            ["client", "result"], registry=self.registry,
        )
        self.provider = Gauge(
            "charrnn_execution_provider",
            "1 for the onnxruntime execution provider actually running each loaded model version.",
            ["model", "version", "provider"], registry=self.registry, multiprocess_mode="livemax",
        )
        self.default_version = Gauge(
            "charrnn_model_default_version", "The version requests without a version get, per model.",
            ["model"], registry=self.registry, multiprocess_mode="livemax",
        )
        self.load_failures = Counter(
            "charrnn_model_load_failures", "Model versions refused while reloading (bad sha256, broken ONNX, ...).",
            ["model", "version"], registry=self.registry,
        )
        self.last_run = Gauge(
            "charrnn_last_run_timestamp_seconds", "Unix time at which each model's last onnxruntime run ended.",
            ["model"], registry=self.registry, multiprocess_mode="max",
        )

    def observe_run(self, model: str, words: int, seconds: float) -> None:
        """Record one onnxruntime run."""
        children = self._run_children.get(model)
        if children is None:
            children = self._run_children[model] = (
                self.inference_seconds.labels(model), self.batch_words.labels(model), self.last_run.labels(model)
            )
        children[0].observe(seconds)
        children[1].observe(words)
        children[2].set_to_current_time()

    def model_counts(self, model: str) -> ModelCounts:
        """One model's totals since start-up, read back from the metrics (not kept twice)."""
        ok = failed = 0
        request_seconds = 0.0
        for family in self.totals.collect():
            if family.name not in ("charrnn_requests", "charrnn_request_seconds"):
                continue
            for sample in family.samples:
                if sample.labels.get("model") != model or sample.labels.get("method") not in INFERENCE_METHODS:
                    continue
                if sample.name == "charrnn_requests_total":
                    if sample.labels["code"] == "OK":
                        ok += int(sample.value)
                    else:
                        failed += int(sample.value)
                elif sample.name == "charrnn_request_seconds_sum":
                    request_seconds += sample.value

        def value(name: str) -> float:
            return self.totals.get_sample_value(name, {"model": model}) or 0.0

        return ModelCounts(
            requests_ok=ok,
            requests_failed=failed,
            request_seconds=request_seconds,
            queued=int(value("charrnn_queue_wait_seconds_count")),
            queue_seconds=value("charrnn_queue_wait_seconds_sum"),
            runs=int(value("charrnn_inference_seconds_count")),
            run_seconds=value("charrnn_inference_seconds_sum"),
            words_run=int(value("charrnn_batch_words_sum")),
            last_run_unix_s=value("charrnn_last_run_timestamp_seconds"),
        )

    def show_versions(self, providers: Mapping[str, Mapping[int, str]], defaults: Mapping[str, int]) -> None:
        """Replace the loaded-version gauges: each model's loaded versions with their provider, and its default
        (an unloaded version's series goes, so the label set stays that of what is loaded)."""
        shown = {(model, str(version), provider) for model, versions in providers.items()
                 for version, provider in versions.items()}
        for labels in self._shown - shown:
            self._unshow(self.provider, labels)
        for model in self._shown_defaults - defaults.keys():
            self._unshow(self.default_version, (model,))
        self._shown, self._shown_defaults = shown, set(defaults)
        for labels in shown:
            self.provider.labels(*labels).set(1)
        for model, version in defaults.items():
            self.default_version.labels(model).set(version)

    def _unshow(self, gauge: Gauge, labels: tuple[str, ...]) -> None:
        if self.totals is self.registry:
            gauge.remove(*labels)
        else:  # multiprocess mode cannot remove a series: zero it (multiprocess_registry() leaves zeros out)
            gauge.labels(*labels).set(0)

    def model_load_failed(self, model: str, version: int, _error: str) -> None:
        """Count one refused model version (server.core.repository.FailureHook)."""
        self.load_failures.labels(model, str(version)).inc()

    def serve(self, port: int, address: str) -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks a free one)."""
        return serve_registry(self.registry, port, address)


class _LoadedOnly:
    """The multiprocess sum without the zeroed series of unloaded versions (see Metrics.show_versions)."""

    _DROP_ZEROS = ("charrnn_execution_provider", "charrnn_model_default_version")

    def __init__(self, path: str) -> None:
        self._collector = MultiProcessCollector(None, path)

    def collect(self) -> Iterable[Metric]:
        for family in self._collector.collect():
            if family.name in self._DROP_ZEROS:
                family.samples = [sample for sample in family.samples if sample.value != 0]
            yield family


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry of every worker's metrics summed (counters, histograms) or aggregated (gauges: the live
    workers' maximum), from the multiprocess directory `path`: what the supervisor serves."""
    registry = CollectorRegistry()
    registry.register(_LoadedOnly(path))  # type: ignore[arg-type]
    return registry


def serve_registry(registry: CollectorRegistry, port: int, address: str) -> int:
    """Expose a registry's /metrics over HTTP; returns the bound port (port 0 picks a free one)."""
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return int(server.server_address[1])


@dataclass(frozen=True, slots=True)
class ModelCounts:
    """One model's totals since start-up, both protocols together (Metrics.model_counts)."""

    requests_ok: int
    """Inference RPCs (INFERENCE_METHODS; a stream counts per message) answered OK."""
    requests_failed: int
    """Inference RPCs answered with an error (for a loaded model; unknown names are not counted per model)."""
    request_seconds: float
    """Server time of those RPCs, OK and failed together (charrnn_request_seconds has no code label)."""
    queued: int
    """Requests that waited for a batch (charrnn_queue_wait_seconds_count)."""
    queue_seconds: float
    """Their total wait."""
    runs: int
    """onnxruntime runs (batches)."""
    run_seconds: float
    """Their total time in onnxruntime."""
    words_run: int
    """Words those runs encoded."""
    last_run_unix_s: float
    """When the last run ended (0.0 before the first)."""
