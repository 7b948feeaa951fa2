"""What one load run is asked to do (LoadConfig) and what it measured (LoadResult, merged over processes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from clients.security import PLAINTEXT, ClientSecurity


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One load run."""

    target: str
    model: str
    concurrency: int = 1
    words_per_request: int = 1
    word_length: int = 8
    duration_s: float | None = 5.0
    """Measure for this long (ignored when requests is set)."""
    requests: int | None = None
    """Send exactly this many measured requests, then stop."""
    stream: bool = False
    processes: int = 1
    warmup_s: float = 0.5
    echo: bool = False
    echo_response_bytes: int = 0
    timeout_s: float = 120.0
    seed: int = 0
    security: ClientSecurity = PLAINTEXT
    """TLS and token (picklable: spawned load processes connect the same way)."""
    fields: tuple[str, ...] | None = None
    """The arrays each request asks for (clients.client.FIELDS; None: all)."""
    connections: int = 1
    """TCP connections per process (a server's --workers spread connections, not requests)."""

    @property
    def mode(self) -> str:
        """unary, stream, echo or echo-stream."""
        if self.echo:
            return "echo-stream" if self.stream else "echo"
        return "stream" if self.stream else "unary"


@dataclass(slots=True)
class Partial:
    """What one process measured."""

    ok: int = 0
    issued: int = 0
    warmup: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    retryable_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    window_s: float = 0.0
    response_bytes: int = 0


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Merged results of a run; `latency_ms` holds p50, p90, p99, mean and max of successful requests."""

    mode: str
    target: str
    model: str
    concurrency: int
    words_per_request: int
    word_length: int
    processes: int
    duration_s: float
    requests: int
    words: int
    issued: int
    warmup_requests: int
    errors: dict[str, int]
    """Failed requests by code, and the server's ErrorInfo reason where it sent one (clients.errors.error_label)."""
    retryable_errors: int
    """How many of those clients.errors.is_retryable() calls worth another try (overload, draining, transport)."""
    requests_per_s: float
    words_per_s: float
    latency_ms: dict[str, float]
    response_bytes: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """Human-readable report."""
        errors = ", ".join(f"{count} {code}" for code, count in sorted(self.errors.items())) or "none"
        if self.errors:
            errors += f" ({self.retryable_errors} retryable)"
        lat = self.latency_ms
        return (
            f"{self.mode} on {self.target}, model {self.model!r}: concurrency {self.concurrency}, "
            f"{self.words_per_request} word(s)/request of {self.word_length} letters, {self.processes} process(es)\n"
            f"  requests:   {self.requests} ok in {self.duration_s:.2f} s; errors: {errors}; "
            f"{self.issued} sent in all ({self.warmup_requests} warm-up)\n"
            f"  throughput: {self.requests_per_s:,.1f} requests/s, {self.words_per_s:,.1f} words/s; "
            f"{self.response_bytes:,} B per response\n"
            f"  latency ms: p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  "
            f"mean {lat['mean']:.3f}  max {lat['max']:.3f}"
        )


def merge(config: LoadConfig, parts: list[Partial], processes: int) -> LoadResult:
    """One result from what each process measured (their windows are aligned: throughputs add up)."""
    latencies = np.array([value for part in parts for value in part.latencies], dtype=np.float64) * 1000.0
    errors: dict[str, int] = {}
    for part in parts:
        for code, count in part.errors.items():
            errors[code] = errors.get(code, 0) + count
    ok = sum(part.ok for part in parts)
    window = max((part.window_s for part in parts), default=0.0)
    # Each process measured the same (barrier-aligned) window: throughputs add up.
    requests_per_s = sum(part.ok / part.window_s for part in parts if part.window_s > 0)

    def percentile(q: float) -> float:
        return float(np.percentile(latencies, q)) if latencies.size else float("nan")

    return LoadResult(
        mode=config.mode,
        target=config.target,
        model=config.model,
        concurrency=config.concurrency,
        words_per_request=config.words_per_request,
        word_length=config.word_length,
        processes=processes,
        duration_s=window,
        requests=ok,
        words=ok * config.words_per_request,
        issued=sum(part.issued for part in parts),
        warmup_requests=sum(part.warmup for part in parts),
        errors=errors,
        retryable_errors=sum(part.retryable_errors for part in parts),
        requests_per_s=requests_per_s,
        words_per_s=requests_per_s * config.words_per_request,
        latency_ms={
            "p50": percentile(50),
            "p90": percentile(90),
            "p99": percentile(99),
            "mean": float(latencies.mean()) if latencies.size else float("nan"),
            "max": float(latencies.max()) if latencies.size else float("nan"),
        },
        response_bytes=max((part.response_bytes for part in parts), default=0),
    )
