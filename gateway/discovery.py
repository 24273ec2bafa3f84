"""Where the gateway learns which workers exist: a fixed list of addresses, or the Redis registry
(plus any fixed addresses given beside it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from common.discovery.record import RegistryKeys, WorkerRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    role: str
    address: str
    events_stream: str = ""  # the worker's KV event stream in Redis, if it publishes one


class StaticDiscovery:
    def __init__(self, prefill: list[str], decode: list[str]) -> None:
        self.static = [Member("prefill", a) for a in prefill] + [Member("decode", a) for a in decode]

    async def members(self) -> list[Member]:
        return list(self.static)

    async def close(self) -> None:
        pass


class RedisDiscovery(StaticDiscovery):
    """Workers whose records have not expired. If Redis cannot be reached, the last known set is
    kept (workers are still health-checked directly), so a Redis outage does not empty the pools."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: RegistryKeys,
        prefill: list[str],
        decode: list[str],
        secret: bytes | None = None,
    ) -> None:
        super().__init__(prefill, decode)
        self.secret = secret  # records must be signed with it (a stray process cannot join a pool)
        self._refused: set[str] = set()
        self.client = client
        self.keys = keys
        self._last: list[Member] = []
        self._failing = False

    async def members(self) -> list[Member]:
        try:
            ids = sorted(m.decode() if isinstance(m, bytes) else m for m in await self.client.smembers(self.keys.index))
            names = [self.keys.worker(i) for i in ids]
            raws = await self.client.mget(names) if names else []
            expired = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if expired:  # a worker that died without deregistering: its record expired, drop it from the index
                await self.client.srem(self.keys.index, *expired)
        except (RedisError, OSError) as e:
            if not self._failing:
                log.warning("registry unreachable; keeping the %d workers last seen: %s", len(self._last), e)
            self._failing = True
            return self.static + self._last
        if self._failing:
            log.info("registry reachable again")
        self._failing = False
        found = []
        for name, raw in zip(names, raws, strict=True):
            if raw is None:
                continue
            try:
                rec = WorkerRecord.decode(raw)
            except ValidationError as e:
                log.warning("ignoring a malformed registry record %r: %s", name, e.errors()[0]["msg"])
                continue
            if not rec.verified(self.secret):
                if name not in self._refused:
                    log.warning("ignoring registry record %r: not signed with the deployment's secret", name)
                    self._refused.add(name)
                continue
            found.append(Member(rec.role, rec.address, rec.events_stream))
        self._last = found
        return self.static + found

    async def close(self) -> None:
        await self.client.aclose()
