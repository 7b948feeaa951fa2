"""Server settings: command-line flags, each with a CHARRNN_* environment variable as its default.

ServerConfig owns every default (the flags read theirs from it) and builds the core's settings
(engine_settings(): Limits, BatchSettings), so no other module restates a default or converts a unit.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.core.batcher import BatchSettings
from server.core.engine import EngineSettings, Limits
from server.core.runtime import DEVICES


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the server is told at start-up."""

    repository: Path = Path("./model_repository")
    """Model repository written by charrnn-export."""
    address: str = "0.0.0.0"
    """Interface to listen on."""
    port: int = 50051
    """gRPC port; 0 picks a free one (see port_file)."""
    device: str = "auto"
    """auto (CUDA provider first, CPU fallback), cuda (fail unless CUDA runs) or cpu."""
    grace_seconds: float = 10.0
    """On SIGTERM/SIGINT, how long in-flight requests may take to finish."""
    max_words: int = 4096
    """Words per request or stream message."""
    max_word_length: int = 256
    """Characters per word."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message received or sent."""
    metrics_port: int = 9090
    """Prometheus /metrics HTTP port; -1 disables, 0 picks a free one."""
    log_level: str = "INFO"
    """Logging level name."""
    batching: bool = True
    """Merge concurrent requests for one model into one onnxruntime run."""
    max_batch_words: int = 4096
    """Largest merged batch, in words."""
    max_queue_delay_ms: float = 5.0
    """How long a non-full batch waits for company once concurrency is evident; 0 never waits."""
    max_queue_gap_ms: float = 1.0
    """A waiting batch runs once no request has joined it for this long; 0 waits all of max_queue_delay_ms."""
    max_queue_words: int = 65536
    """Words allowed to wait per model before RESOURCE_EXHAUSTED."""
    run_threads: int = 1
    """onnxruntime threads running each model's batches (off the event loop); also its runs in flight."""
    port_file: Path | None = None
    """If set, the bound gRPC and metrics ports are written here as JSON once serving."""
    keep_versions: int = 1
    """Versions of each model kept loaded (the newest that load); requests without a version get the highest."""
    poll_seconds: float = 0.0
    """Rescan the repository this often, as SIGHUP does; 0 never polls."""
    metrics_address: str | None = None
    """Interface of the /metrics HTTP server; None: the gRPC address."""
    tls_cert: Path | None = None
    """PEM certificate chain: serve TLS on the gRPC port (with tls_key)."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: require client certificates signed by it (mTLS); needs tls_cert."""
    auth_token_file: Path | None = None
    """Bearer tokens, one `NAME TOKEN` per line; every service but grpc.health.v1 then needs one."""
    watch_interval_s: float = 1.0
    """How often certificate and token files are checked for changes; 0: only SIGHUP reloads them."""
    max_inflight_bytes: int = 256 * 1024 * 1024
    """Request bytes being decoded or queued at once, over all calls; beyond it RESOURCE_EXHAUSTED (retryable)."""
    max_concurrent_streams: int = 128
    """Concurrent RPCs per HTTP/2 connection."""
    keepalive_min_ping_interval_s: float = 10.0
    """Clients pinging more often than this (without data) get GOAWAY after two strikes."""
    max_connection_idle_s: float = 600.0
    """Close a connection with no RPC for this long; 0: never."""
    max_connection_age_s: float = 0.0
    """Close (GOAWAY) connections older than this, so clients reconnect and rebalance; 0: never."""
    max_connection_age_grace_s: float = 30.0
    """After max_connection_age, how long RPCs in flight get to finish."""
    inline_max_us: float = 500.0
    """Runs predicted (per model, by batch size) to take at most this many microseconds run on the event loop
    instead of onnxruntime's thread, whose hand-off costs more than such a run; 0: never (server/core/inline.py).
    500, not 100: on 2 busy cores a one-word run inline takes 80-140 us (its compute alone 25 us), so at 100
    almost every run took the thread, at 0.6-1.8 ms a run and 4-15 % more server CPU per request (README)."""
    workers: int = field(default_factory=lambda: usable_cores())
    """Server processes sharing the port (SO_REUSEPORT) under one supervisor (server/supervisor.py); 1: this
    process serves alone. Default (auto): one per usable core, the fastest measured on a 2-core machine with
    one connection per request in flight (README, **Workers**)."""
    worker_index: int | None = None
    """Set by the supervisor on the processes it starts (a hidden flag): this one is worker N of several."""

    @property
    def tls(self) -> bool:
        """Whether the gRPC port serves TLS."""
        return self.tls_cert is not None

    def grpc_options(self) -> list[tuple[str, int]]:
        """The grpc server's channel arguments: message sizes, streams per connection, keepalive enforcement,
        connection idle and age limits (in grpc's milliseconds)."""
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # Only a supervisor's workers share the port; a lone server must fail on a taken port, not split it.
            ("grpc.so_reuseport", 0 if self.worker_index is None else 1),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.keepalive_min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
        if self.max_connection_idle_s > 0:
            options.append(("grpc.max_connection_idle_ms", _ms(self.max_connection_idle_s)))
        if self.max_connection_age_s > 0:
            options.append(("grpc.max_connection_age_ms", _ms(self.max_connection_age_s)))
            options.append(("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace_s)))
        return options

    def limits(self) -> Limits:
        """What one request may ask for."""
        return Limits(max_words=self.max_words, max_word_length=self.max_word_length)

    def batch_settings(self) -> BatchSettings | None:
        """Each model's dynamic batching settings, or None with batching off."""
        if not self.batching:
            return None
        return BatchSettings(
            max_batch_words=self.max_batch_words,
            max_delay_s=self.max_queue_delay_ms / 1000.0,
            max_queue_words=self.max_queue_words,
            max_gap_s=self.max_queue_gap_ms / 1000.0,
        )

    def engine_settings(self) -> EngineSettings:
        """Everything server.core.engine.load_engine needs besides the repository."""
        return EngineSettings(
            self.device, self.run_threads, self.limits(), self.batch_settings(), keep_versions=self.keep_versions,
            inline_max_s=self.inline_max_us / 1e6,
        )


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU quota ("max 100000" or "QUOTA PERIOD"): what a container's --cpus or a pod's limit sets."""
CFS_DIR = Path("/sys/fs/cgroup/cpu")
"""cgroup v1's CPU controller (cpu.cfs_quota_us, -1 for none, and cpu.cfs_period_us): the same quota on hosts
that still mount v1, such as Debian's Docker 20.10 here."""


def _quota_cores(cpu_max: Path, cfs_dir: Path) -> int | None:
    """The CPU quota in whole cores (rounded up), from cgroup v2 or else v1; None where there is none."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cfs_dir / "cpu.cfs_quota_us").read_text())
        period_us = int((cfs_dir / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else math.ceil(quota_us / period_us)


def usable_cores(cpu_max: Path = CPU_MAX, cfs_dir: Path = CFS_DIR) -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), lowered to the cgroup's CPU quota
    rounded up (a container's --cpus, a Kubernetes CPU limit), at least 1."""
    cores = len(os.sched_getaffinity(0))
    quota = _quota_cores(cpu_max, cfs_dir)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _workers(value: str) -> int:
    if value.strip().lower() == "auto":
        return usable_cores()
    return int(value)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


DEFAULTS = ServerConfig()
"""The defaults every flag shows in --help and falls back to."""


def _env(environ: Mapping[str, str], name: str, default: Any) -> Any:
    # The raw string: argparse then converts it with the option's type= (only when the flag is absent),
    # so a malformed value is a usage error, and a flag still overrides it.
    value = environ.get(name)
    return default if value in (None, "") else value


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {value!r}")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The charrnn-server command line; defaults come from the environment."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="charrnn-server",
        description="Serve a model repository (charrnn-export) over gRPC with onnxruntime.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--repository", type=Path, default=Path(_env(env, "CHARRNN_REPOSITORY", DEFAULTS.repository)),
        help="model repository (env CHARRNN_REPOSITORY)")
    add("--address", default=_env(env, "CHARRNN_ADDRESS", DEFAULTS.address), help="listen address (env CHARRNN_ADDRESS)")
    add("--port", type=int, default=_env(env, "CHARRNN_PORT", DEFAULTS.port),
        help="gRPC port, 0 for any free port (env CHARRNN_PORT)")
    add("--device", choices=DEVICES, default=_env(env, "CHARRNN_DEVICE", DEFAULTS.device),
        help="auto: CUDA provider first, CPU fallback; cuda: fail unless CUDA runs; cpu (env CHARRNN_DEVICE)")
    add("--grace-seconds", type=float, default=_env(env, "CHARRNN_GRACE_SECONDS", DEFAULTS.grace_seconds),
        help="time in-flight requests get on SIGTERM/SIGINT (env CHARRNN_GRACE_SECONDS)")
    add("--max-words", type=int, default=_env(env, "CHARRNN_MAX_WORDS", DEFAULTS.max_words),
        help="words per request or stream message (env CHARRNN_MAX_WORDS)")
    add("--max-word-length", type=int, default=_env(env, "CHARRNN_MAX_WORD_LENGTH", DEFAULTS.max_word_length),
        help="characters per word (env CHARRNN_MAX_WORD_LENGTH)")
    add("--max-message-bytes", type=int, default=_env(env, "CHARRNN_MAX_MESSAGE_BYTES", DEFAULTS.max_message_bytes),
        help="largest gRPC message received or sent (env CHARRNN_MAX_MESSAGE_BYTES)")
    add("--metrics-port", type=int, default=_env(env, "CHARRNN_METRICS_PORT", DEFAULTS.metrics_port),
        help="Prometheus /metrics port; -1 disables, 0 any free port (env CHARRNN_METRICS_PORT)")
    add("--log-level", default=_env(env, "CHARRNN_LOG_LEVEL", DEFAULTS.log_level), help="logging level (env CHARRNN_LOG_LEVEL)")
    add("--batching", action=argparse.BooleanOptionalAction, default=_env(env, "CHARRNN_BATCHING", DEFAULTS.batching),
        help="dynamic batching of concurrent requests (env CHARRNN_BATCHING)")
    add("--max-batch-words", type=int, default=_env(env, "CHARRNN_MAX_BATCH_WORDS", DEFAULTS.max_batch_words),
        help="largest merged batch in words (env CHARRNN_MAX_BATCH_WORDS)")
    add("--max-queue-delay-ms", type=float, default=_env(env, "CHARRNN_MAX_QUEUE_DELAY_MS", DEFAULTS.max_queue_delay_ms),
        help="how long a non-full batch may wait for more requests once traffic is evidently concurrent (a lone "
             "request never waits: a tiny one on an idle model runs at once, with --inline-max-us above 0); 0 never waits "
             "(env CHARRNN_MAX_QUEUE_DELAY_MS)")
    add("--max-queue-gap-ms", type=float, default=_env(env, "CHARRNN_MAX_QUEUE_GAP_MS", DEFAULTS.max_queue_gap_ms),
        help="a waiting batch runs once no request has joined it for this long, before --max-queue-delay-ms if "
             "company stops coming; 0 waits the whole delay (env CHARRNN_MAX_QUEUE_GAP_MS)")
    add("--max-queue-words", type=int, default=_env(env, "CHARRNN_MAX_QUEUE_WORDS", DEFAULTS.max_queue_words),
        help="words waiting per model before RESOURCE_EXHAUSTED (env CHARRNN_MAX_QUEUE_WORDS)")
    add("--run-threads", type=int, default=_env(env, "CHARRNN_RUN_THREADS", DEFAULTS.run_threads),
        help="onnxruntime threads running each model's batches, off the event loop; also the runs a model "
             "may have going at once, batching on or off. One run at a time (bigger batches, a core left to the "
             "event loop) serves small models best; raise it for compute-bound models where cores are to spare "
             "(env CHARRNN_RUN_THREADS)")
    add("--port-file", type=Path, default=_env(env, "CHARRNN_PORT_FILE", DEFAULTS.port_file),
        help="write the bound ports here as JSON once serving (env CHARRNN_PORT_FILE)")
    add("--keep-versions", type=int, default=_env(env, "CHARRNN_KEEP_VERSIONS", DEFAULTS.keep_versions),
        help="versions of each model kept loaded, the newest that load; requests without a version get the "
             "highest (env CHARRNN_KEEP_VERSIONS)")
    add("--poll-seconds", type=float, default=_env(env, "CHARRNN_POLL_SECONDS", DEFAULTS.poll_seconds),
        help="rescan the repository this often, as SIGHUP does; 0 never polls (env CHARRNN_POLL_SECONDS)")
    add("--metrics-address", default=_env(env, "CHARRNN_METRICS_ADDRESS", DEFAULTS.metrics_address),
        help="interface of the /metrics HTTP server; default: --address (env CHARRNN_METRICS_ADDRESS)")
    add("--tls-cert", type=Path, default=_env(env, "CHARRNN_TLS_CERT", DEFAULTS.tls_cert),
        help="PEM certificate chain: serve TLS on the gRPC port; needs --tls-key (env CHARRNN_TLS_CERT)")
    add("--tls-key", type=Path, default=_env(env, "CHARRNN_TLS_KEY", DEFAULTS.tls_key),
        help="PEM private key of --tls-cert (env CHARRNN_TLS_KEY)")
    add("--tls-client-ca", type=Path, default=_env(env, "CHARRNN_TLS_CLIENT_CA", DEFAULTS.tls_client_ca),
        help="PEM CA: require client certificates it signed (mTLS) (env CHARRNN_TLS_CLIENT_CA)")
    add("--auth-token-file", type=Path, default=_env(env, "CHARRNN_AUTH_TOKEN_FILE", DEFAULTS.auth_token_file),
        help="bearer tokens, one `NAME TOKEN` per line (# comments); every service but grpc.health.v1 then "
             "requires `authorization: Bearer TOKEN` (env CHARRNN_AUTH_TOKEN_FILE)")
    add("--watch-interval-s", type=float, default=_env(env, "CHARRNN_WATCH_INTERVAL_S", DEFAULTS.watch_interval_s),
        help="seconds between checks of the certificate and token files for changes; 0: reload on SIGHUP only "
             "(env CHARRNN_WATCH_INTERVAL_S)")
    add("--max-inflight-bytes", type=int, default=_env(env, "CHARRNN_MAX_INFLIGHT_BYTES", DEFAULTS.max_inflight_bytes),
        help="request bytes being decoded or queued at once over all calls; beyond it RESOURCE_EXHAUSTED "
             "(REQUEST_BYTES_IN_FLIGHT, retryable); at least --max-message-bytes (env CHARRNN_MAX_INFLIGHT_BYTES)")
    add("--max-concurrent-streams", type=int,
        default=_env(env, "CHARRNN_MAX_CONCURRENT_STREAMS", DEFAULTS.max_concurrent_streams),
        help="concurrent RPCs per HTTP/2 connection (env CHARRNN_MAX_CONCURRENT_STREAMS)")
    add("--keepalive-min-ping-interval-s", type=float,
        default=_env(env, "CHARRNN_KEEPALIVE_MIN_PING_INTERVAL_S", DEFAULTS.keepalive_min_ping_interval_s),
        help="clients pinging more often than this without data get GOAWAY (env CHARRNN_KEEPALIVE_MIN_PING_INTERVAL_S)")
    add("--max-connection-idle-s", type=float,
        default=_env(env, "CHARRNN_MAX_CONNECTION_IDLE_S", DEFAULTS.max_connection_idle_s),
        help="close connections idle this long; 0: never (env CHARRNN_MAX_CONNECTION_IDLE_S)")
    add("--max-connection-age-s", type=float,
        default=_env(env, "CHARRNN_MAX_CONNECTION_AGE_S", DEFAULTS.max_connection_age_s),
        help="send GOAWAY to connections older than this so clients reconnect (and rebalance over replicas); "
             "0: never (env CHARRNN_MAX_CONNECTION_AGE_S)")
    add("--max-connection-age-grace-s", type=float,
        default=_env(env, "CHARRNN_MAX_CONNECTION_AGE_GRACE_S", DEFAULTS.max_connection_age_grace_s),
        help="time RPCs in flight get after --max-connection-age-s (env CHARRNN_MAX_CONNECTION_AGE_GRACE_S)")
    add("--inline-max-us", type=float, default=_env(env, "CHARRNN_INLINE_MAX_US", DEFAULTS.inline_max_us),
        help="runs predicted to take at most this many microseconds (a per-model moving average by batch size) "
             "run on the event loop, skipping the hand-off to onnxruntime's thread; never a batch size not yet "
             "seen or one averaging over 1 ms; 0: every run on onnxruntime's thread (env CHARRNN_INLINE_MAX_US)")
    add("--workers", type=_workers, default=_env(env, "CHARRNN_WORKERS", DEFAULTS.workers),
        help="server processes sharing the port (SO_REUSEPORT), each with its own sessions and batcher, under a "
             "supervisor that restarts a dead one and forwards SIGTERM/SIGHUP; auto: one per usable core. "
             "Connections, not requests, are spread over them (env CHARRNN_WORKERS)")
    add("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_config(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse flags (and environment defaults) into a checked ServerConfig."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if isinstance(args.batching, str):
        try:
            args.batching = _flag(args.batching)
        except ValueError as error:
            parser.error(f"CHARRNN_BATCHING: {error}")
    if args.device not in DEVICES:  # argparse does not check choices against environment defaults
        parser.error(f"CHARRNN_DEVICE: invalid choice {args.device!r} (choose from {', '.join(DEVICES)})")
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        parser.error(f"--log-level / CHARRNN_LOG_LEVEL: unknown level {args.log_level!r}")
    for name in ("max_words", "max_word_length", "max_message_bytes", "max_batch_words", "max_queue_words",
                 "run_threads", "keep_versions", "max_concurrent_streams", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if (args.grace_seconds < 0 or args.max_queue_delay_ms < 0 or args.max_queue_gap_ms < 0 or args.poll_seconds < 0
            or args.inline_max_us < 0):
        parser.error("--grace-seconds, --max-queue-delay-ms, --max-queue-gap-ms, --poll-seconds and --inline-max-us "
                     "cannot be negative")
    for name in ("watch_interval_s", "keepalive_min_ping_interval_s", "max_connection_idle_s",
                 "max_connection_age_s", "max_connection_age_grace_s"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} cannot be negative")
    if args.max_inflight_bytes < args.max_message_bytes:
        parser.error("--max-inflight-bytes must be at least --max-message-bytes (else the largest message never fits)")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together: give both or neither")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    return ServerConfig(**vars(args))
