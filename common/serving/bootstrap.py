"""Start a worker process: its models (common/serving/model_pool.py), the gRPC server with the role's
services, metrics, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from typing import Protocol

import grpc

from common.engine.async_engine import AsyncEngine
from common.repository.store import use_repository
from common.rpc import worker_pb2_grpc
from common.rpc.channels import CHANNEL_OPTIONS
from common.serving.drain import drain
from common.serving.grpc_errors import ErrorInterceptor
from common.serving.health import WorkerHealth
from common.serving.metrics import serve_metrics
from common.serving.model_pool import ModelPool
from common.serving.presence import RegistryPresence
from common.serving.worker_servicer import WorkerIdentity, WorkerServicer
from common.settings import WorkerSettings
from common.tracing.setup import init_tracing, shutdown_tracing

log = logging.getLogger(__name__)


class Role(Protocol):
    """What a worker role adds to the common worker: the services around each model's engine, and
    the servicers on the gRPC server that send each call to its model's services."""

    backends: tuple[str, ...]

    def for_model(self, engine: AsyncEngine, identity: WorkerIdentity) -> object:
        """One model's services (may have `close()`, called when the model is evicted)."""
        ...

    def register(self, server: grpc.aio.Server, pool: ModelPool) -> None: ...

    async def close(self) -> None: ...


async def run_worker(settings: WorkerSettings, role: Role) -> None:
    use_repository(settings.model_repo)
    worker_id = settings.worker_id or f"{settings.role}-{uuid.uuid4().hex[:8]}"
    init_tracing(f"kvrelay-{settings.role}", settings.tracing, instance_id=worker_id)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=CHANNEL_OPTIONS)
    port = _listen(server, settings)
    if settings.port == 0:  # a free port was asked for: advertise the one it got
        metrics = settings.metrics_port if settings.metrics_port is not None else 0
        settings = settings.model_copy(update={"port": port, "metrics_port": metrics})
    identity = WorkerIdentity(
        worker_id=worker_id,
        role=settings.role,
        address=settings.address,
        transfer_backends=role.backends,
        pool=settings.pool,
    )
    budget = settings.memory_budget_mb * 2**20 if settings.memory_budget_mb else None
    pool = ModelPool(
        settings.models or [settings.engine.model or "default"],
        settings.engine,
        lambda engine: role.for_model(engine, identity),
        budget,
        settings.model_load_timeout_s,
        progress=True,
    )
    await pool.preload(settings.preload)
    servicer = WorkerServicer(pool, identity)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health = WorkerHealth()
    health.add_to(server)
    role.register(server, pool)
    metrics_port = settings.metrics_port if settings.metrics_port is not None else settings.port + 1000
    metrics_port = serve_metrics(pool, settings.role, worker_id, settings.host, metrics_port)
    await server.start()
    try:
        if settings.health_port is not None:
            await health.serve_alone(settings.host, settings.health_port)
        presence = await RegistryPresence.open(settings, identity, pool) if settings.registry else None
    except BaseException:
        await health.stop()
        await server.stop(None)
        await pool.shutdown()
        raise
    await health.set_serving(True)
    log.info(
        "%s worker %s serving %s on %s:%d (metrics :%d, transfer %s)",
        settings.role,
        identity.worker_id,
        ", ".join(pool.known),
        settings.host,
        port,
        metrics_port,
        role.backends,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s worker %s stopping", settings.role, identity.worker_id)
    await health.set_serving(False)
    await drain(settings, servicer, pool, server, presence)
    await pool.shutdown()
    await role.close()
    await health.stop()
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
