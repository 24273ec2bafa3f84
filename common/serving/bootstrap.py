"""Start a worker process: engine, gRPC server with the role's services, metrics, clean shutdown."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import uuid
from collections.abc import Callable

import grpc

from common.engine.async_engine import AsyncEngine
from common.engine.factory import build_engine
from common.rpc import worker_pb2_grpc
from common.rpc.channels import CHANNEL_OPTIONS
from common.serving.drain import drain
from common.serving.grpc_errors import ErrorInterceptor
from common.serving.health import WorkerHealth
from common.serving.metrics import serve_metrics
from common.serving.presence import RegistryPresence
from common.serving.worker_servicer import WorkerIdentity, WorkerServicer
from common.settings import WorkerSettings
from common.tracing.setup import init_tracing, shutdown_tracing

log = logging.getLogger(__name__)

AddServices = Callable[[grpc.aio.Server, AsyncEngine, WorkerIdentity], object]


async def run_worker(settings: WorkerSettings, add_services: AddServices, backends: tuple[str, ...]) -> None:
    worker_id = settings.worker_id or f"{settings.role}-{uuid.uuid4().hex[:8]}"
    init_tracing(f"kvrelay-{settings.role}", settings.tracing, instance_id=worker_id)
    engine = build_engine(settings.engine)
    runner = AsyncEngine(engine)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=CHANNEL_OPTIONS)
    port = _listen(server, settings)
    if settings.port == 0:  # a free port was asked for: advertise the one it got
        metrics = settings.metrics_port if settings.metrics_port is not None else 0
        settings = settings.model_copy(update={"port": port, "metrics_port": metrics})
    identity = WorkerIdentity(
        worker_id=worker_id,
        role=settings.role,
        address=settings.address,
        transfer_backends=backends,
    )
    servicer = WorkerServicer(runner, identity)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health = WorkerHealth()
    health.add_to(server)
    extra = add_services(server, runner, identity)
    metrics_port = settings.metrics_port if settings.metrics_port is not None else settings.port + 1000
    metrics_port = serve_metrics(engine, settings.role, worker_id, settings.host, metrics_port)
    await server.start()
    try:
        if settings.health_port is not None:
            await health.serve_alone(settings.host, settings.health_port)
        presence = await RegistryPresence.open(settings, identity, engine) if settings.registry else None
    except BaseException:
        await health.stop()
        await server.stop(None)
        runner.shutdown()
        raise
    await health.set_serving(True)
    log.info(
        "%s worker %s serving %s on %s:%d (metrics :%d, transfer %s)",
        settings.role,
        identity.worker_id,
        engine.layout.model_id,
        settings.host,
        port,
        metrics_port,
        backends,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s worker %s stopping", settings.role, identity.worker_id)
    await health.set_serving(False)
    await drain(settings, servicer, runner, server, presence)
    close = getattr(extra, "close", None)
    if close is not None:
        result = close()
        if inspect.isawaitable(result):
            await result
    await health.stop()
    runner.shutdown()
    shutdown_tracing()


def _listen(server: grpc.aio.Server, settings: WorkerSettings) -> int:
    listen = f"{settings.host}:{settings.port}"
    if settings.tls.enabled:  # mutual TLS: only clients with a certificate from the deployment's CA
        port = server.add_secure_port(listen, settings.tls.server_credentials())
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return port
