"""Follows every worker's KV events into the gateway's prefix index.

`KVEventWatcher` reads each worker's own `WatchEvents` gRPC stream. A stream opens where the
index left off; a snapshot replaces the view; a gap (a sequence number skipped) drops the stream
and reopens it from 0, which makes the worker send a fresh snapshot. (With a Redis registry,
`gateway.kv_event_stream` reads the same events from Redis Streams instead.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable

import grpc

from common.kv.events import KVEvent
from common.rpc import worker_pb2, worker_pb2_grpc
from common.rpc.channels import ChannelPool
from gateway.cancellation import cancel_and_wait, reraise_if_cancelling
from gateway.metrics import KV_EVENT_RESYNCS
from gateway.scheduling.prefix_index import PrefixIndex

log = logging.getLogger(__name__)
_RETRY_S = 1.0
_STOP_TIMEOUT_S = 5.0


async def fetch_snapshot(channels: ChannelPool, address: str, timeout: float = 10.0) -> tuple[list[int], int]:
    """The worker's cached block hashes and the event seq they are current to."""
    stub = worker_pb2_grpc.WorkerServiceStub(channels.get(address))
    call = stub.WatchEvents(worker_pb2.WatchEventsRequest(after_seq=0), timeout=timeout)
    try:
        async for batch in call:
            if batch.snapshot:
                return list(batch.snapshot_hashes), batch.last_seq
    finally:
        call.cancel()
    raise ConnectionError(f"worker {address} ended its event stream without a snapshot")


class KVEventWatcher:
    def __init__(self, channels: ChannelPool, index: PrefixIndex) -> None:
        self.channels = channels
        self.index = index
        self._tasks: dict[str, tuple[str, asyncio.Task]] = {}  # worker id -> (source, task)
        self.resyncs = 0

    def watch(self, worker_id: str, address: str, stream: str = "") -> None:
        """Follow this worker's events (idempotent). A new stream for a known worker id (it restarted)
        replaces the old one and its view."""
        source, task = self._tasks.get(worker_id, ("", None))
        if task is not None and not task.done() and source == stream:
            return
        if task is not None:
            self.unwatch(worker_id)
        coro = self._follower(worker_id, address, stream)
        self._tasks[worker_id] = (stream, asyncio.get_running_loop().create_task(coro))

    def unwatch(self, worker_id: str) -> None:
        _, task = self._tasks.pop(worker_id, ("", None))
        if task is not None:
            task.cancel()
        self.index.forget(worker_id)

    def watching(self) -> set[str]:
        return set(self._tasks)

    async def stop(self) -> None:
        """Stop every follower and wait until each has ended (at most a few seconds: never block
        shutdown on one). A follower that outlived this would keep moving the index."""
        tasks = [t for _, t in self._tasks.values()]
        self._tasks.clear()
        stuck = await cancel_and_wait(tasks, _STOP_TIMEOUT_S)
        if stuck:
            log.warning("%d KV event followers did not stop within %.0fs", len(stuck), _STOP_TIMEOUT_S)

    def following(self, worker_id: str) -> bool:
        """Whether the calling task is still this worker's follower: false once unwatched or stopped,
        so a follower whose cancellation a library swallowed still ends at its next turn."""
        _, task = self._tasks.get(worker_id, ("", None))
        return task is not None and task is asyncio.current_task()

    def apply(self, worker_id: str, events: Iterable[KVEvent]) -> bool:
        """Apply events in order; on a gap, count a resync and return False (the caller resyncs)."""
        if all(self.index.apply(worker_id, e.seq, e.kind, e.block_hash) for e in events):
            return True
        self.resyncs += 1
        KV_EVENT_RESYNCS.inc()
        log.info("KV event gap from %s; resyncing from a snapshot", worker_id)
        return False

    def _follower(self, worker_id: str, address: str, stream: str) -> Coroutine[None, None, None]:
        """The task that follows one worker: here always its gRPC event stream."""
        return self._follow(worker_id, address)

    async def _follow(self, worker_id: str, address: str) -> None:
        stub = worker_pb2_grpc.WorkerServiceStub(self.channels.get(address))
        while self.following(worker_id):
            after = 0 if self.index.needs_snapshot(worker_id) else self.index.last_seq(worker_id)
            pause = _RETRY_S
            try:
                async for batch in stub.WatchEvents(worker_pb2.WatchEventsRequest(after_seq=after)):
                    if not self.following(worker_id):
                        return
                    if batch.snapshot:
                        self.index.snapshot(worker_id, batch.snapshot_hashes, batch.last_seq)
                        continue
                    if not self.apply(worker_id, (KVEvent(e.seq, e.kind, e.block_hash) for e in batch.events)):
                        pause = 0.0
                        break
            except grpc.aio.AioRpcError as e:
                reraise_if_cancelling()
                log.debug("KV event stream from %s ended: %s", worker_id, e.code().name)
            await asyncio.sleep(pause)
