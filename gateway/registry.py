"""The gateway's view of its workers: a static list of addresses, polled for Stats so that only
workers that answer take traffic. (The Redis-backed registry plugs in behind the same methods.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc

from common.rpc import worker_pb2, worker_pb2_grpc
from common.rpc.channels import ChannelPool

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    address: str
    role: str  # configured role; Stats must agree
    healthy: bool = False
    stats: worker_pb2.StatsResponse | None = None
    last_seen: float = 0.0
    error: str | None = None

    @property
    def worker_id(self) -> str:
        return self.stats.worker_id if self.stats else self.address


@dataclass
class StaticRegistry:
    channels: ChannelPool
    prefill: list[str]
    decode: list[str]
    interval_s: float = 1.0
    workers: dict[tuple[str, str], WorkerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role, addrs in (("prefill", self.prefill), ("decode", self.decode)):
            for a in addrs:
                self.workers[(role, a)] = WorkerState(a, role)
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.poll_once()
        self._task = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def healthy(self, role: str) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.role == role and w.healthy]

    def pick(self, role: str) -> WorkerState | None:
        """Round-robin over the healthy workers of a role."""
        pool = self.healthy(role)
        return pool[next(self._rr[role]) % len(pool)] if pool else None

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._probe(w) for w in self.workers.values()))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll_once()

    async def _probe(self, w: WorkerState) -> None:
        stub = worker_pb2_grpc.WorkerServiceStub(self.channels.get(w.address))
        try:
            stats = await stub.Stats(worker_pb2.StatsRequest(), timeout=max(0.5, self.interval_s))
        except grpc.aio.AioRpcError as e:
            if w.healthy:
                log.warning("%s worker %s stopped answering: %s", w.role, w.address, e.code().name)
            w.healthy, w.error = False, e.code().name
            return
        if stats.role != w.role:
            w.healthy, w.error = False, f"configured as {w.role} but reports role {stats.role!r}"
            return
        if not w.healthy:
            log.info("%s worker %s (%s) is up", w.role, stats.worker_id, w.address)
        w.healthy, w.stats, w.last_seen, w.error = True, stats, time.time(), None
