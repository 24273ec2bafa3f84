"""Graceful shutdown of a worker, so that scaling a pool down loses no request:

1. report `draining` in Stats and leave the registry, so gateways stop choosing this worker;
2. keep serving for `drain_notice_s`, the time gateways need to notice (a request routed here just
   before they did still succeeds);
3. wait until no engine holds anything: no queued or running request, no prefill KV still pinned
   for a decode worker to pull;
4. stop the gRPC server, letting in-flight calls end within what is left of `drain_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from common.serving.model_pool import ModelPool
from common.serving.presence import RegistryPresence
from common.serving.worker_servicer import WorkerServicer
from common.settings import WorkerSettings

log = logging.getLogger(__name__)
_POLL_S = 0.1


async def drain(
    settings: WorkerSettings,
    servicer: WorkerServicer,
    pool: ModelPool,
    server: grpc.aio.Server,
    presence: RegistryPresence | None,
) -> None:
    deadline = time.monotonic() + settings.drain_timeout_s
    servicer.draining = True
    if presence is not None:
        await presence.withdraw()
    log.info("draining: taking no new work after %.1fs, finishing what is in flight", settings.drain_notice_s)
    await asyncio.sleep(settings.drain_notice_s)
    while time.monotonic() < deadline:
        left = sum([(await e.stats())["sequences"] for e in pool.engines().values()])
        if not left:
            break
        await asyncio.sleep(_POLL_S)
    else:
        log.warning("drain timed out after %.0fs with requests still in the engine", settings.drain_timeout_s)
    servicer.closing.set()
    await server.stop(grace=max(1.0, deadline - time.monotonic()))
    log.info("drained")
