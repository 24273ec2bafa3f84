"""KV events from Redis Streams: every gateway replica reads every worker's stream (no consumer
group: each needs all events), so replicas hold the same prefix index and route alike.

Per worker: take a snapshot over gRPC (hashes current to seq S), then read the stream from its
start, skipping events <= S. An entry is acknowledged locally (the read position moves past it)
only once all its events applied; a gap (the stream was trimmed past this reader, or the
publisher lost events) leads to a fresh snapshot and a re-read from the same position.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.discovery.event_stream import decode_entry
from common.rpc.channels import ChannelPool
from gateway.cancellation import reraise_if_cancelling
from gateway.kv_events import KVEventWatcher, fetch_snapshot
from gateway.scheduling.prefix_index import PrefixIndex

log = logging.getLogger(__name__)
_BLOCK_MS = 1000
_RETRY_S = 1.0


class RedisKVEventWatcher(KVEventWatcher):
    def __init__(self, channels: ChannelPool, index: PrefixIndex, client: aioredis.Redis) -> None:
        super().__init__(channels, index)
        self.client = client

    def _follower(self, worker_id: str, address: str, stream: str) -> Coroutine[None, None, None]:
        if not stream:  # a worker given by address, not registered: read its gRPC stream
            return super()._follower(worker_id, address, stream)
        return self._follow_stream(worker_id, address, stream)

    async def _follow_stream(self, worker_id: str, address: str, stream: str) -> None:
        position = b"0"
        while self.following(worker_id):
            try:
                if self.index.needs_snapshot(worker_id):
                    hashes, seq = await fetch_snapshot(self.channels, address)
                    if not self.following(worker_id):
                        return
                    self.index.snapshot(worker_id, hashes, seq)
                reply = await self.client.xread({stream: position}, count=64, block=_BLOCK_MS)
            except (RedisError, OSError, ConnectionError, grpc.aio.AioRpcError) as e:
                reraise_if_cancelling()
                log.debug("KV events of %s unavailable (retrying): %s", worker_id, e)
                await asyncio.sleep(_RETRY_S)
                continue
            reraise_if_cancelling()
            if not self.following(worker_id):
                return  # stopped while the read was in flight: apply nothing more
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    try:
                        events = decode_entry(fields)
                    except ValueError as e:
                        log.warning("skipping a bad entry %s in %s: %s", entry_id, stream, e)
                        position = entry_id
                        continue
                    if not self.apply(worker_id, events):
                        break  # needs_snapshot is now true; re-read this entry after it
                    position = entry_id
