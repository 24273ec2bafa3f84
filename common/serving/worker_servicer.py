"""WorkerService, served by both roles: health, load and cache stats (per model), and the KV event
stream (one per worker: every model's engine reports to the pool's log)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from common.errors import EngineStoppedError
from common.rpc import worker_pb2, worker_pb2_grpc
from common.rpc.convert import layout_to_proto
from common.serving.model_pool import ModelPool

_EVENT_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    role: str
    address: str
    transfer_backends: tuple[str, ...]
    pool: str = ""


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, pool: ModelPool, identity: WorkerIdentity) -> None:
        self.pool = pool
        self.identity = identity
        self.draining = False  # reported in Stats: gateways stop choosing this worker
        self.closing = asyncio.Event()  # ends the event streams so the server can stop

    async def Health(self, request, context):  # noqa: N802, ANN001, ANN201 - gRPC names
        return worker_pb2.HealthResponse(ok=True, worker_id=self.identity.worker_id, role=self.identity.role)

    async def Stats(self, request, context):  # noqa: N802, ANN001, ANN201
        models = [_model_stats(m) for m in await self.pool.model_stats()]
        engines = [await e.stats() for e in self.pool.engines().values()]
        first = models[0]
        return worker_pb2.StatsResponse(
            worker_id=self.identity.worker_id,
            role=self.identity.role,
            model_id=first.model_id,
            layout=first.layout,
            waiting=sum(s["waiting"] for s in engines),
            running=sum(s["running"] for s in engines),
            pinned=sum(s["pinned"] for s in engines),
            free_blocks=first.free_blocks,
            total_blocks=first.total_blocks,
            cached_blocks=sum(s["cached_blocks"] for s in engines),
            prefix_query_tokens=sum(s["prefix_query_tokens"] for s in engines),
            prefix_hit_tokens=sum(s["prefix_hit_tokens"] for s in engines),
            transfer_backends=list(self.identity.transfer_backends),
            transfer_endpoint=self.identity.address,
            max_model_len=first.max_model_len,
            draining=self.draining,
            models=models,
            memory_budget_bytes=self.pool.budget_bytes or 0,
            pool=self.identity.pool,
        )

    async def WatchEvents(  # noqa: N802
        self, request: worker_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.KVEventBatch]:
        log = self.pool.events
        after = request.after_seq
        held = log.since(after)
        if after == 0 or (held and held[0].seq != after + 1) or (not held and log.last_seq > after):
            # The caller is behind what the log still holds: send the whole cache, then follow. The
            # position is taken first, so what changes while the snapshot is read is sent again after
            # it (stores and removals are idempotent for the reader).
            after = log.last_seq
            hashes: list[int] = []
            for engine in self.pool.engines().values():
                with contextlib.suppress(EngineStoppedError):  # unloaded meanwhile: its blocks were removed
                    hashes += await engine.call(engine.cached_block_hashes)
            yield worker_pb2.KVEventBatch(snapshot=True, snapshot_hashes=hashes, last_seq=after)
        while not context.cancelled() and not self.closing.is_set():
            events = log.since(after)
            if events:
                after = events[-1].seq
                yield worker_pb2.KVEventBatch(
                    events=[
                        worker_pb2.KVEvent(seq=e.seq, kind=e.kind, block_hash=e.block_hash, parent_hash=e.parent_hash)
                        for e in events
                    ],
                    last_seq=after,
                )
            else:
                await asyncio.to_thread(log.wait, after, _EVENT_POLL_S)


def _model_stats(m: dict) -> worker_pb2.ModelStats:
    layout = m["layout"]
    return worker_pb2.ModelStats(
        **{k: v for k, v in m.items() if k != "layout"},
        layout=layout_to_proto(layout) if layout is not None else None,
    )
