"""The gateway's view of its workers: who exists (from a discovery source: a fixed list or the
Redis registry), polled for Stats so that only workers that answer, and are not draining, take
traffic. Workers that leave the registry are dropped along with their prefix-index view."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from common.rpc import types_pb2, worker_pb2, worker_pb2_grpc
from common.rpc.channels import ChannelPool
from gateway.cancellation import cancel_and_wait, reraise_if_cancelling
from gateway.discovery import Member, StaticDiscovery
from gateway.kv_events import KVEventWatcher
from gateway.scheduling.types import Candidate, Placement

log = logging.getLogger(__name__)
_MAX_STRIKES = 3
_STOP_TIMEOUT_S = 5.0


@dataclass
class WorkerState:
    address: str
    role: str  # configured role; Stats must agree
    events_stream: str = ""
    healthy: bool = False
    strikes: int = 0  # consecutive slow or failed polls
    stats: worker_pb2.StatsResponse | None = None
    last_seen: float = 0.0
    error: str | None = None
    models: dict[str, worker_pb2.ModelStats] = field(default_factory=dict)  # from stats, per poll

    @property
    def worker_id(self) -> str:
        return self.stats.worker_id if self.stats else self.address

    def candidate(
        self,
        placement: Placement,
        model: str,
        layout_error: str | None,
        inflight_tokens: int,
        pending_blocks: int = 0,
        streams: int = 0,
        stream_limit: int = 0,
    ) -> Candidate:
        s = self.stats
        m = self.models.get(model)
        return Candidate(
            worker_id=self.worker_id,
            address=self.address,
            role=self.role,
            healthy=self.healthy,
            draining=s.draining if s else False,
            layout_ok=layout_error is None,
            waiting=s.waiting if s else 0,
            running=s.running if s else 0,
            free_blocks=m.free_blocks if m else 0,
            total_blocks=m.total_blocks if m and m.total_blocks else 1,
            inflight_tokens=inflight_tokens,
            pending_blocks=pending_blocks,
            streams=max(streams, s.running + s.waiting if s else 0),
            stream_limit=stream_limit,
            serves_model=m is not None,
            model_loaded=m is not None and m.loaded,
            in_pool=not placement.pool or (s is not None and s.pool == placement.pool),
        )


def _models_of(stats: worker_pb2.StatsResponse) -> dict[str, worker_pb2.ModelStats]:
    if stats.models:
        return {m.model_id: m for m in stats.models}
    # A worker that reports one model only, in the top-level fields.
    one = worker_pb2.ModelStats(
        model_id=stats.model_id,
        loaded=True,
        layout=stats.layout,
        free_blocks=stats.free_blocks,
        total_blocks=stats.total_blocks,
        max_model_len=stats.max_model_len,
    )
    return {stats.model_id: one}


@dataclass(frozen=True)
class PoolView:
    """One role's workers for one model as of the last poll, for the per-request path: computed once
    per poll (or when a worker is marked down), not once per request."""

    states: list[WorkerState]  # every worker of the role (those that do not serve the model are filtered)
    ids: list[str]  # the states' worker ids, in the same order
    by_load: list[str]  # healthy worker ids serving the model, least loaded first (queued + running)
    layout_errors: dict[str, str]  # address -> why it must not be chosen for this model
    block_size: int = 16  # tokens per KV block of this model in the decode pool


@dataclass
class WorkerRegistry:
    channels: ChannelPool
    discovery: StaticDiscovery
    interval_s: float = 1.0
    model_id: str = ""  # the default model: of calls that name none
    watcher: KVEventWatcher | None = None
    workers: dict[tuple[str, str], WorkerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._views: dict[tuple[str, str], PoolView] | None = None

    def pool(self, role: str, model: str = "") -> PoolView:
        if self._views is None:
            self.refresh_views()
        assert self._views is not None
        model = model or self.model_id
        view = self._views.get((role, model))
        if view is None:  # no worker serves it: every worker of the role, none chosen
            states = [w for w in self.workers.values() if w.role == role]
            view = PoolView(states, [w.worker_id for w in states], [], {})
        return view

    def models(self) -> set[str]:
        """Every model some worker serves, as of the last poll."""
        return {m for w in self.workers.values() for m in w.models}

    def refresh_views(self) -> None:
        for w in self.workers.values():
            w.models = _models_of(w.stats) if w.stats is not None else {}
        views = {}
        for model in self.models() | {self.model_id}:
            errors = self.layout_errors(model)
            ref = self.reference_layout(model)
            block_size = ref.block_size if ref is not None else 16
            for role in ("prefill", "decode"):
                states = [w for w in self.workers.values() if w.role == role]
                serving = [w for w in states if w.healthy and w.stats is not None and model in w.models]
                serving.sort(key=lambda w: (w.stats.waiting + w.stats.running, w.worker_id))
                views[(role, model)] = PoolView(
                    states, [w.worker_id for w in states], [w.worker_id for w in serving], errors, block_size
                )
        self._views = views

    async def start(self) -> None:
        await self.poll_once()
        self._task = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        # The poll loop first: it starts followers, so stopping the watcher before it could leave
        # a follower started after the watcher had stopped.
        self._stopping = True
        if self._task and await cancel_and_wait([self._task], _STOP_TIMEOUT_S):
            log.warning("the worker poll loop did not stop within %.0fs", _STOP_TIMEOUT_S)
        if self.watcher is not None:
            await self.watcher.stop()
        await self.discovery.close()

    def mark_down(self, address: str, reason: str) -> None:
        """A call to this worker failed as unavailable: stop choosing it until it answers a poll again."""
        for w in self.workers.values():
            if w.address == address:
                w.healthy, w.error = False, reason
        self.refresh_views()

    def healthy(self, role: str) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.role == role and w.healthy]

    def reference_layout(self, model: str = "") -> types_pb2.KVLayout | None:
        """The layout `model`'s KV must have to be exchanged here: that of the first healthy decode
        worker that has loaded it (decode workers are the ones that pull)."""
        model = model or self.model_id
        for w in sorted(self.healthy("decode"), key=lambda w: w.address):
            m = w.models.get(model)
            if m is not None and m.HasField("layout"):
                return m.layout
        return None

    def block_size(self, model: str = "") -> int:
        """Tokens per KV block of `model` in the decode pool, as of the last poll."""
        return self.pool("decode", model).block_size

    def layout_errors(self, model: str = "") -> dict[str, str]:
        """address -> why that worker must not be chosen for `model` (a layout that differs)."""
        model = model or self.model_id
        ref = self.reference_layout(model)
        errors: dict[str, str] = {}
        if ref is None:
            return errors
        for w in self.workers.values():
            m = w.models.get(model)
            if m is None or not m.HasField("layout") or m.layout == ref:
                continue
            diff = [
                f"{f.name}: {getattr(m.layout, f.name)!r} != {getattr(ref, f.name)!r}"
                for f in ref.DESCRIPTOR.fields
                if getattr(m.layout, f.name) != getattr(ref, f.name)
            ]
            errors[w.address] = "KV layout differs from the decode pool's: " + "; ".join(diff)
        return errors

    async def poll_once(self) -> None:
        await self._reconcile(await self.discovery.members())
        await asyncio.gather(*(self._probe(w) for w in self.workers.values()))
        if self.watcher is not None and not self._stopping:
            for w in self.workers.values():
                if w.healthy and w.stats:
                    self.watcher.watch(w.worker_id, w.address, w.events_stream)
        self.refresh_views()

    async def _reconcile(self, members: list[Member]) -> None:
        wanted = {(m.role, m.address): m for m in members}
        for key in list(self.workers):
            if key not in wanted:
                gone = self.workers.pop(key)
                log.info("%s worker %s (%s) left the registry", gone.role, gone.worker_id, gone.address)
                if self.watcher is not None and gone.stats:
                    self.watcher.unwatch(gone.worker_id)
        for key, m in wanted.items():
            w = self.workers.get(key)
            if w is None:
                self.workers[key] = WorkerState(m.address, m.role, m.events_stream)
            elif w.events_stream != m.events_stream:
                w.events_stream = m.events_stream  # restarted at the same address

    async def _poll_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.interval_s)
            await self.poll_once()
            reraise_if_cancelling()

    async def _probe(self, w: WorkerState) -> None:
        stub = worker_pb2_grpc.WorkerServiceStub(self.channels.get(w.address))
        try:
            stats = await stub.Stats(worker_pb2.StatsRequest(), timeout=max(2.0, 2 * self.interval_s))
        except grpc.aio.AioRpcError as e:
            reraise_if_cancelling()
            # Refused means gone; a slow answer on a loaded machine is one strike of _MAX_STRIKES.
            w.strikes += 1
            if w.healthy and (e.code() is grpc.StatusCode.UNAVAILABLE or w.strikes >= _MAX_STRIKES):
                log.warning("%s worker %s stopped answering: %s", w.role, w.address, e.code().name)
                w.healthy = False
            if not w.healthy:
                w.error = e.code().name
            return
        w.strikes = 0
        if stats.role != w.role:
            w.healthy, w.error = False, f"configured as {w.role} but reports role {stats.role!r}"
            return
        if w.stats is not None and w.stats.worker_id != stats.worker_id and self.watcher is not None:
            self.watcher.unwatch(w.stats.worker_id)  # a new process at the same address
        if not w.healthy:
            log.info("%s worker %s (%s) is up", w.role, stats.worker_id, w.address)
        w.healthy, w.stats, w.last_seen, w.error = True, stats, time.time(), None
