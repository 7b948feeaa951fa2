"""charrnn-server: load the repository, serve gRPC with health and reflection, stop gracefully on SIGTERM/SIGINT.

With --workers N > 1, main() hands over to server/supervisor.py, which runs N of these processes on one port."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from export.manifest import ManifestError
from server.config import ServerConfig, parse_config
from server.core.admission import ByteBudget
from server.core.engine import Engine, load_engine
from server.core.repository import RepositoryWatcher
from server.core.runtime import DeviceUnavailableError
from server.grpc import kserve_v2
from server.grpc.auth import TokenFileError
from server.grpc.charrnn_v1 import SERVICE_NAME, CharRnnService, add_to_server
from server.grpc.malformed import ParsingRegistrar
from server.grpc.security import CredentialsError, ServerSecurity, is_loopback
from server.metrics import Metrics

logger = logging.getLogger(__name__)

OVERALL = ""  # the health service's name for the server as a whole
SERVICES = (SERVICE_NAME, kserve_v2.SERVICE_NAME)
"""The front ends on the one port (charrnn.v1 and the Open Inference Protocol), each with a health status."""

SUPERVISOR_CHECK_S = 1.0
"""How often a worker checks that its supervisor is still there."""

ReloadHook = Callable[[], Awaitable[None]]
"""Re-reads one kind of state (certificates, tokens, the model repository) on SIGHUP; raises if it cannot,
leaving what it had in place."""


@dataclass(slots=True)
class RunningServer:
    """A started server and what stopping it needs."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    engine: Engine
    metrics: Metrics
    metrics_port: int | None
    budget: ByteBudget
    """The byte budget every front end takes a request's bytes from while it is in flight (--max-inflight-bytes)."""
    reload_hooks: list[ReloadHook] = field(default_factory=list)
    """What SIGHUP re-reads, in order: the server's one reload signal (certificates, tokens, models)."""
    rescan_repository: ReloadHook | None = None
    """The model-repository hook alone (one of reload_hooks): what --poll-seconds runs."""
    stop_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Run by stop() once the server has stopped (e.g. the certificate and token file watcher)."""

    async def reload(self) -> bool:
        """Run every reload hook; one that fails is logged and the others still run. True if all succeeded."""
        succeeded = True
        for hook in self.reload_hooks:
            try:
                await hook()
            except Exception:
                succeeded = False
                logger.exception("reload: %s failed; keeping what it had", getattr(hook, "__qualname__", hook))
        logger.info("reload done (%d part(s)%s)", len(self.reload_hooks), "" if succeeded else ", with failures")
        return succeeded

    async def stop(self, grace_seconds: float) -> None:
        """Report NOT_SERVING, stop taking RPCs, let in-flight ones finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_seconds)
        for hook in self.stop_hooks:
            await hook()
        await self.engine.close()


async def create_server(config: ServerConfig) -> RunningServer:
    """Bind the port, register the services, load every model, then report SERVING."""
    metrics = Metrics()
    # Certificates and tokens are read before anything listens: a bad file is a start-up error naming it.
    security = ServerSecurity.load(config.tls_cert, config.tls_key, config.tls_client_ca, config.auth_token_file, metrics)
    if security.tokens is not None and security.certificates is None and not is_loopback(config.address):
        logger.warning("bearer tokens over plaintext on %s: anyone on the path can read them "
                       "(fine only if TLS ends in front of the server, e.g. at a mesh sidecar)", config.address)
    # TLS and tokens are server-wide: every service registered on this server is behind them.
    server = grpc.aio.server(options=config.grpc_options(), interceptors=security.interceptors)
    health_servicer = health.aio.HealthServicer()
    for name in (OVERALL, *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # grpcio's own services register through ParsingRegistrar: bytes that do not parse get MALFORMED_REQUEST.
    registrar = ParsingRegistrar(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(  # what enable_server_reflection registers on a grpc.aio server
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        ),
        registrar,
    )
    budget = ByteBudget(config.max_inflight_bytes)  # one budget over every front end
    service = CharRnnService(metrics, budget)
    add_to_server(service, server)
    v2_service = kserve_v2.KServeV2Service(metrics, health_servicer, config.batch_settings(), budget)
    kserve_v2.add_to_server(v2_service, server)
    try:
        port = security.add_port(server, f"{_host(config.address)}:{config.port}")
    except RuntimeError as error:  # grpcio raises instead of returning 0 when the port is taken
        raise OSError(f"cannot listen on {config.address}:{config.port}: {error}") from error
    if port == 0:
        raise OSError(f"cannot listen on {config.address}:{config.port}")
    await server.start()  # health answers NOT_SERVING and RPCs UNAVAILABLE while the models load
    engine: Engine | None = None
    try:
        engine = await asyncio.get_running_loop().run_in_executor(
            None, load_engine, config.repository, config.engine_settings(), metrics.observe_run
        )
        engine.start()
        metrics_port = _serve_metrics(metrics, config) if config.metrics_port >= 0 else None
    except BaseException:
        await server.stop(None)
        if engine is not None:
            await engine.close()
        raise
    service.attach(engine)
    v2_service.attach(engine)
    models = engine.models
    repository_watcher = RepositoryWatcher(
        config.repository, engine, config.engine_settings(), metrics.model_load_failed
    )
    _show_versions(metrics, engine)

    async def rescan_repository() -> None:
        """The model repository (server/core/repository.py): load new versions, swap defaults, unload removed."""
        try:
            await repository_watcher.rescan()
        finally:
            _show_versions(metrics, engine)

    for name in (OVERALL, *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "serving %s on %s:%d (%s; metrics %s, batching %s); models: %s",
        " and ".join(SERVICES), config.address, port, security.describe(),
        f"port {metrics_port}" if metrics_port is not None else "off",
        "on" if config.batching else "off",
        ", ".join(f"{m.name} [{m.manifest.kind}, {m.provider}]" for m in models.values()),
    )
    running = RunningServer(server, port, health_servicer, engine, metrics, metrics_port, budget)
    running.reload_hooks.append(rescan_repository)  # SIGHUP: the model repository,
    running.rescan_repository = rescan_repository  # (alone, what --poll-seconds runs)
    running.reload_hooks.extend(security.reload_hooks)  # then certificates, then tokens
    file_watcher = security.watcher(config.watch_interval_s)  # ... those two also when their files change
    file_watcher.start()
    running.stop_hooks.append(file_watcher.stop)
    return running


def _show_versions(metrics: Metrics, engine: Engine) -> None:
    metrics.show_versions(
        {name: {v: m.provider for v, m in engine.served_versions(name).items()} for name in engine.models},
        {name: model.version for name, model in engine.models.items()},
    )


def _serve_metrics(metrics: Metrics, config: ServerConfig) -> int:
    address = config.metrics_address or config.address
    try:
        return metrics.serve(config.metrics_port, address)
    except OSError as error:
        raise OSError(f"cannot serve metrics on {address}:{config.metrics_port}: {error}") from error


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain within the grace period; SIGHUP reloads (RunningServer.reload)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[bool]] = set()
    # Until the server is up, SIGHUP is ignored rather than fatal (its default action kills the process).
    loop.add_signal_handler(signal.SIGHUP, lambda: logger.info("SIGHUP before start-up finished: ignored"))
    running = await create_server(config)

    def on_sighup() -> None:
        logger.info("SIGHUP: reloading")
        task = asyncio.ensure_future(running.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    poller = asyncio.ensure_future(_poll(running.rescan_repository, config.poll_seconds)) if config.poll_seconds > 0 else None
    if config.port_file is not None:
        config.port_file.write_text(json.dumps({"port": running.port, "metrics_port": running.metrics_port}))
    orphaned = asyncio.ensure_future(_watch_supervisor(stop)) if config.worker_index is not None else None
    await stop.wait()
    if orphaned is not None:
        orphaned.cancel()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Stopping already: a second stop signal (Ctrl-C reaches a supervisor's workers directly and forwarded)
        # must not kill the process once the loop's handlers are gone, after the drain.
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)
    logger.info("signal received: draining for up to %.1f s", config.grace_seconds)
    if poller is not None:
        poller.cancel()
    await running.stop(config.grace_seconds)
    logger.info("stopped")


async def _watch_supervisor(stop: asyncio.Event) -> None:
    """A worker whose supervisor is gone (killed outright, so it forwarded nothing) drains and exits as on
    SIGTERM rather than serve on, orphaned, on a port nobody manages."""
    supervisor = os.getppid()
    while os.getppid() == supervisor:
        await asyncio.sleep(SUPERVISOR_CHECK_S)
    logger.warning("the supervisor (pid %d) is gone: stopping", supervisor)
    stop.set()


async def _poll(rescan: ReloadHook | None, seconds: float) -> None:
    """--poll-seconds: rescan the model repository every `seconds`, as SIGHUP does (its other hooks are not polled)."""
    while rescan is not None:
        await asyncio.sleep(seconds)
        try:
            await rescan()
        except Exception:
            logger.exception("repository poll failed; keeping the loaded models")


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit 0 after a graceful stop, 1 if the repository or device is unusable."""
    config = parse_config(argv)
    who = "" if config.worker_index is None else f"[worker {config.worker_index}] "
    logging.basicConfig(level=config.log_level.upper(), format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s")
    if config.workers > 1:
        from server.supervisor import supervise

        return supervise(config, sys.argv[1:] if argv is None else list(argv))
    try:
        asyncio.run(serve(config))
    except (ManifestError, DeviceUnavailableError, OSError, CredentialsError, TokenFileError) as error:
        logger.error("cannot start: %s", error)
        print(f"charrnn-server: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
