"""Lease bookkeeping never waits behind an engine step, and release and expiry are decided once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from common.engine.async_engine import AsyncEngine
from common.engine.leases import LeaseTable
from common.errors import UnknownRequestError
from tests.helpers import assert_no_leaks, greedy, tiny_engine, tiny_model

PROMPT = list(range(1, 12))


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return tiny_model()


def test_release_extend_and_export_answer_while_a_step_runs(model):
    """A pinned request's KV can be exported, extended and released while the engine thread is stuck
    in a long step (here: held on an event); the blocks are freed once the step is over."""
    engine = tiny_engine(model, lease_seconds=30)
    in_step, let_go = threading.Event(), threading.Event()

    async def main() -> None:
        runner = AsyncEngine(engine)
        try:
            async for out in runner.generate("p", PROMPT, greedy(8), prefill_only=True):
                assert out.pinned
            real_step = engine.step

            def slow_step():  # noqa: ANN202
                in_step.set()
                let_go.wait(10)
                return real_step()

            engine.step = slow_step
            busy = asyncio.ensure_future(_collect(runner, "busy", [5, 6, 7], 3))
            await asyncio.to_thread(in_step.wait, 5)  # the engine thread is now inside a step
            t0 = time.monotonic()
            export = await runner.export_kv("p")
            extended = await runner.extend_lease("p")
            assert extended.lease_deadline > export.lease_deadline
            assert await runner.release("p") and not await runner.release("p")
            assert time.monotonic() - t0 < 0.5 and not let_go.is_set()  # none of it waited for the step
            assert engine.stats()["pinned"] == 1  # freeing is the engine thread's, after the step
            let_go.set()
            await busy
            engine.step = real_step
            for _ in range(100):
                if not engine.seqs:
                    break
                await asyncio.sleep(0.02)
        finally:
            let_go.set()
            runner.shutdown()

    asyncio.run(main())
    assert_no_leaks(engine)


async def _collect(runner: AsyncEngine, rid: str, prompt: list[int], n: int) -> list[int]:
    return [t async for o in runner.generate(rid, prompt, greedy(n)) for t in o.new_token_ids]


def test_a_release_after_expiry_is_refused_and_frees_once(model):
    engine = tiny_engine(model, lease_seconds=0.05)
    engine.add_request("p", PROMPT, greedy(8), prefill_only=True)
    while engine.has_unfinished():
        engine.step()
    time.sleep(0.1)
    assert not engine.release("p")  # expired: what a pull read may be stale
    with pytest.raises(UnknownRequestError):
        engine.extend_lease("p")
    assert engine.settle_leases() == ["p"] and engine.settle_leases() == []
    assert_no_leaks(engine)


def test_release_racing_expiry_ends_each_lease_exactly_once():
    table = LeaseTable()
    now = time.monotonic()
    for i in range(2000):
        table.pin(f"r{i}", [i], 1, now + (i % 7) * 0.001)
    released: list[str] = []
    settled: list[str] = []
    lock = threading.Lock()

    def releaser(ids: range) -> None:
        for i in ids:
            if table.release(f"r{i}"):
                with lock:
                    released.append(f"r{i}")

    def settler() -> None:
        for _ in range(200):
            got = table.settle()
            with lock:
                settled.extend(got)

    threads = [threading.Thread(target=releaser, args=(range(k, 2000, 4),)) for k in range(4)]
    threads.append(threading.Thread(target=settler))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.01)
    settled += table.settle()
    assert sorted(settled) == sorted(f"r{i}" for i in range(2000))  # every lease ended, once
    assert len(set(settled)) == len(settled)
    assert set(released) <= set(settled) and table.next_deadline() is None
