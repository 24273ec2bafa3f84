"""A worker's presence in the Redis registry: its record (kept alive by heartbeats) and its KV
event stream. Opened after the gRPC server listens; withdrawn first thing when draining."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import redis.asyncio as aioredis

from common.discovery.announcer import Announcer
from common.discovery.event_stream import EventPublisher
from common.discovery.record import RegistryKeys, WorkerRecord
from common.discovery.redis_client import check_redis, open_redis
from common.serving.model_pool import ModelPool
from common.serving.worker_servicer import WorkerIdentity
from common.settings import WorkerSettings


class RegistryPresence:
    def __init__(self, client: aioredis.Redis, announcer: Announcer, publisher: EventPublisher) -> None:
        self.client = client
        self.announcer = announcer
        self.publisher = publisher
        self._task: asyncio.Task | None = None

    @classmethod
    async def open(cls, settings: WorkerSettings, identity: WorkerIdentity, pool: ModelPool) -> RegistryPresence:
        assert settings.registry is not None
        client = open_redis(settings.registry)
        await check_redis(client, settings.registry)
        keys = RegistryKeys(settings.registry_prefix)
        incarnation = uuid.uuid4().hex[:12]
        # The record describes the first model (its layout once it has been loaded: none may be yet,
        # with a preload list that leaves it out); Stats say the rest, per model, as it changes.
        first = pool.known[pool.default]
        engine = pool.engines().get(pool.default)
        record = WorkerRecord(
            worker_id=identity.worker_id,
            role=identity.role,
            address=identity.address,
            model_id=pool.default,
            models=list(pool.known),
            layout=first.layout.to_dict() if first.layout is not None else {},
            total_blocks=engine.cache.num_blocks if engine is not None else 0,
            max_model_len=first.max_model_len,
            transfer_backends=list(identity.transfer_backends),
            incarnation=incarnation,
            started_at=time.time(),
            events_stream=keys.events(identity.worker_id, incarnation),
        ).signed(settings.shared_secret())
        ttl_ms = int(settings.registry_ttl_s * 1000)
        announcer = Announcer(client, record, keys, settings.registry_ttl_s, settings.heartbeat_s)
        presence = cls(client, announcer, EventPublisher(client, pool.events, record.events_stream, ttl_ms))
        presence._task = asyncio.get_running_loop().create_task(presence.publisher.run())
        await announcer.register()
        return presence

    async def withdraw(self) -> None:
        """Deregister and stop publishing events; gateways drop this worker on their next poll."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.announcer.deregister()
        await self.client.aclose()
