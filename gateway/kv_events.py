"""Follows every worker's KV events (WorkerService.WatchEvents) into the gateway's prefix index.

A stream opens where the index left off; a snapshot replaces the view; a gap (a sequence number
skipped) drops the stream and reopens it from 0, which makes the worker send a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from common.rpc import worker_pb2, worker_pb2_grpc
from common.rpc.channels import ChannelPool
from gateway.scheduling.prefix_index import PrefixIndex

log = logging.getLogger(__name__)
_RETRY_S = 1.0


class KVEventWatcher:
    def __init__(self, channels: ChannelPool, index: PrefixIndex) -> None:
        self.channels = channels
        self.index = index
        self._tasks: dict[str, asyncio.Task] = {}
        self.resyncs = 0

    def watch(self, worker_id: str, address: str) -> None:
        task = self._tasks.get(worker_id)
        if task is None or task.done():
            self._tasks[worker_id] = asyncio.get_running_loop().create_task(self._follow(worker_id, address))

    def unwatch(self, worker_id: str) -> None:
        task = self._tasks.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self.index.forget(worker_id)

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _follow(self, worker_id: str, address: str) -> None:
        stub = worker_pb2_grpc.WorkerServiceStub(self.channels.get(address))
        while True:
            after = 0 if self.index.needs_snapshot(worker_id) else self.index.last_seq(worker_id)
            pause = _RETRY_S
            try:
                async for batch in stub.WatchEvents(worker_pb2.WatchEventsRequest(after_seq=after)):
                    if batch.snapshot:
                        self.index.snapshot(worker_id, batch.snapshot_hashes, batch.last_seq)
                        continue
                    if not all(self.index.apply(worker_id, e.seq, e.kind, e.block_hash) for e in batch.events):
                        self.resyncs += 1
                        log.info("KV event gap from %s; resyncing from a snapshot", worker_id)
                        pause = 0.0
                        break
            except grpc.aio.AioRpcError as e:
                log.debug("KV event stream from %s ended: %s", worker_id, e.code().name)
            await asyncio.sleep(pause)
