"""Background loops stop for sure, even when a library swallows their cancellation (as redis-py
can on a blocking read and grpc.aio does by turning it into an RpcError)."""

from __future__ import annotations

import asyncio

from gateway.cancellation import cancel_and_wait
from gateway.kv_events import KVEventWatcher
from gateway.scheduling.prefix_index import PrefixIndex


async def _swallows(times: int, log: list[str]) -> None:
    """A loop that loses its first `times` cancellations, the way a swallowing library call would."""
    lost = 0
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if lost == times:
                log.append("stopped")
                raise
            lost += 1
            asyncio.current_task().uncancel()  # the cancellation is gone without a trace


def test_cancel_and_wait_cancels_again_until_the_task_ends():
    async def run() -> None:
        log: list[str] = []
        task = asyncio.create_task(_swallows(3, log))
        await asyncio.sleep(0)
        assert await cancel_and_wait([task], timeout=5.0) == set()
        assert task.cancelled() and log == ["stopped"]

    asyncio.run(run())


def test_cancel_and_wait_gives_up_after_its_timeout_and_says_which():
    async def run() -> None:
        task = asyncio.create_task(_swallows(10**9, []))
        await asyncio.sleep(0)
        assert await cancel_and_wait([task], timeout=0.3) == {task}
        assert not task.done()
        task.get_coro().close()  # a coroutine that never yields to cancellation: end it by hand
        await asyncio.sleep(0)

    asyncio.run(run())


class _SwallowingWatcher(KVEventWatcher):
    """A follower whose every read swallows the cancellation and returns, as redis-py 8 did."""

    reads = 0

    async def _follow(self, worker_id: str, address: str) -> None:
        while self.following(worker_id):
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()
            self.reads += 1


def test_a_follower_whose_cancellation_is_swallowed_still_stops():
    async def run() -> None:
        watcher = _SwallowingWatcher(channels=None, index=PrefixIndex())  # type: ignore[arg-type]
        watcher.watch("w1", "127.0.0.1:1")
        watcher.watch("w2", "127.0.0.1:2")
        tasks = [t for _, t in watcher._tasks.values()]
        await asyncio.sleep(0.1)
        watcher.unwatch("w2")  # one cancellation, swallowed: the follower must end anyway
        await asyncio.sleep(0.1)
        assert tasks[1].done()
        await watcher.stop()
        assert all(t.done() for t in tasks)
        reads = watcher.reads
        await asyncio.sleep(0.1)
        assert watcher.reads == reads  # nothing reads after stop()

    asyncio.run(run())
