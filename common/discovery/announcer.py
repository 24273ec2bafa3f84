"""The worker side of the registry: register, heartbeat (renewing the record's TTL), deregister.

A worker that dies without deregistering disappears when its record expires; one that drains
deregisters first, so gateways stop choosing it before it stops serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.discovery.record import RegistryKeys, WorkerRecord

log = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self,
        client: aioredis.Redis,
        record: WorkerRecord,
        keys: RegistryKeys,
        ttl_s: float = 5.0,
        interval_s: float = 1.0,
    ) -> None:
        if interval_s >= ttl_s:
            raise ValueError(f"heartbeat interval ({interval_s}s) must be shorter than the TTL ({ttl_s}s)")
        self.client = client
        self.record = record
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None

    async def register(self) -> None:
        await self._beat()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())
        log.info("registered %s worker %s at %s", self.record.role, self.record.worker_id, self.record.address)

    async def deregister(self) -> None:
        """Stop heartbeating and remove the record (the event stream goes with it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.worker(self.record.worker_id), self.record.events_stream)
                pipe.srem(self.keys.index, self.record.worker_id)
                await pipe.execute()
        except (RedisError, OSError) as e:
            log.warning("could not deregister %s (its record will expire): %s", self.record.worker_id, e)
        else:
            log.info("deregistered %s worker %s", self.record.role, self.record.worker_id)

    async def _beat(self) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.worker(self.record.worker_id), self.record.encode(), px=self.ttl_ms)
            pipe.sadd(self.keys.index, self.record.worker_id)  # gateways find the record through this
            if self.record.events_stream:
                pipe.pexpire(self.record.events_stream, self.ttl_ms)
            await pipe.execute()

    async def _heartbeat(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._beat()
            except (RedisError, OSError) as e:
                if not failing:
                    log.warning("registry heartbeat failed (will keep trying): %s", e)
                failing = True
            else:
                if failing:
                    log.info("registry heartbeat restored")
                failing = False
