"""WorkerService, served by both roles: health, load and cache stats, and the KV event stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from common.engine.async_engine import AsyncEngine
from common.rpc import worker_pb2, worker_pb2_grpc
from common.rpc.convert import layout_to_proto

_EVENT_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    role: str
    address: str
    transfer_backends: tuple[str, ...]


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: AsyncEngine, identity: WorkerIdentity) -> None:
        self.engine = engine
        self.identity = identity
        self.draining = False  # reported in Stats: gateways stop choosing this worker
        self.closing = asyncio.Event()  # ends the event streams so the server can stop

    async def Health(self, request, context):  # noqa: N802, ANN001, ANN201 - gRPC names
        return worker_pb2.HealthResponse(ok=True, worker_id=self.identity.worker_id, role=self.identity.role)

    async def Stats(self, request, context):  # noqa: N802, ANN001, ANN201
        s = await self.engine.stats()
        eng = self.engine.engine
        return worker_pb2.StatsResponse(
            worker_id=self.identity.worker_id,
            role=self.identity.role,
            model_id=eng.layout.model_id,
            layout=layout_to_proto(eng.layout),
            waiting=s["waiting"],
            running=s["running"],
            pinned=s["pinned"],
            free_blocks=s["free_blocks"],
            total_blocks=s["total_blocks"],
            cached_blocks=s["cached_blocks"],
            prefix_query_tokens=s["prefix_query_tokens"],
            prefix_hit_tokens=s["prefix_hit_tokens"],
            transfer_backends=list(self.identity.transfer_backends),
            transfer_endpoint=self.identity.address,
            max_model_len=eng.max_model_len,
            draining=self.draining,
        )

    async def WatchEvents(  # noqa: N802
        self, request: worker_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.KVEventBatch]:
        log = self.engine.kv_events
        after = request.after_seq
        held = log.since(after)
        if after == 0 or (held and held[0].seq != after + 1) or (not held and log.last_seq > after):
            # The caller is behind what the log still holds: send the whole cache, then follow.
            hashes, after = await self.engine.call(lambda: (self.engine.cached_block_hashes(), log.last_seq))
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
