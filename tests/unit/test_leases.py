"""Lease bookkeeping never waits behind an engine step, and release and expiry are decided once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter

import pytest

from common.engine.async_engine import AsyncEngine
from common.engine.leases import LeaseTable
from common.engine.llm_engine import LLMEngine
from common.errors import UnknownRequestError
from common.rpc import kv_pb2
from common.rpc.convert import layout_to_proto
from kvtransfer.handles import HandleSigner
from kvtransfer.nixl_backend import NixlKVServer, nixl_available
from kvtransfer.service import KVService
from kvtransfer.source import EngineKVSource
from tests.helpers import assert_no_leaks, greedy, run_to_completion, tiny_engine, tiny_model

PROMPT = list(range(1, 12))
_ANSWER_S = 2.0  # far below the gate's own 10 s: an answer that waited for the step cannot make it


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return tiny_model()


class StepGate:
    """Holds the engine thread inside its next step until opened: a long prefill step, on demand."""

    def __init__(self, engine: LLMEngine) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        self._engine, self._step = engine, engine.step
        engine.step = self._held  # type: ignore[method-assign]

    def _held(self):  # noqa: ANN202 - whatever step returns
        self.entered.set()
        self.opened.wait(10)
        return self._step()

    def open(self) -> None:
        self._engine.step = self._step  # type: ignore[method-assign]
        self.opened.set()


async def _pin(runner: AsyncEngine, rid: str, prompt: list[int] = PROMPT) -> None:
    async for out in runner.generate(rid, prompt, greedy(8), prefill_only=True):
        assert out.pinned


async def _collect(runner: AsyncEngine, rid: str, prompt: list[int], n: int) -> list[int]:
    return [t async for o in runner.generate(rid, prompt, greedy(n)) for t in o.new_token_ids]


async def _held_in_a_step(runner: AsyncEngine) -> tuple[StepGate, asyncio.Future]:
    """Put the engine thread inside a step that does not end until the gate opens."""
    gate = StepGate(runner.engine)
    busy = asyncio.ensure_future(_collect(runner, "busy", [5, 6, 7], 3))
    assert await asyncio.to_thread(gate.entered.wait, 5)
    return gate, busy


async def _settled(engine: LLMEngine, timeout: float = 5.0) -> None:
    give_up = time.monotonic() + timeout
    while engine.seqs and time.monotonic() < give_up:
        await asyncio.sleep(0.01)


def test_release_extend_and_export_answer_while_a_step_runs(model):
    """A pinned request's KV can be exported, extended and released while the engine thread is stuck
    in a long step; the blocks are freed once the step is over."""
    engine = tiny_engine(model, lease_seconds=30)

    async def main() -> None:
        runner = AsyncEngine(engine)
        gate = None
        try:
            await _pin(runner, "p")
            gate, busy = await _held_in_a_step(runner)

            async def lease_calls() -> None:
                export = await runner.export_kv("p")
                extended = await runner.extend_lease("p")
                assert extended.lease_deadline > export.lease_deadline
                assert extended.block_ids == export.block_ids
                assert await runner.release("p") and not await runner.release("p")

            await asyncio.wait_for(lease_calls(), _ANSWER_S)
            assert not gate.opened.is_set()  # all of it answered inside the step
            assert engine.stats()["pinned"] == 1  # freeing is the engine thread's, after the step
            gate.open()
            await busy
            await _settled(engine)
        finally:
            if gate is not None:
                gate.open()
            runner.shutdown()

    asyncio.run(main())
    assert_no_leaks(engine)


def test_kv_service_answers_while_a_step_runs(model):
    """The RPCs of a pull (PullBlocks, NixlHandshake) and its Release, served while the engine thread
    is stuck in a step: what the trace showed as a 5 s Release behind a prefill step."""
    engine = tiny_engine(model, lease_seconds=30)
    nixl = NixlKVServer(engine.cache, "lease-test") if nixl_available() else None
    layout = layout_to_proto(engine.layout)

    async def main() -> None:
        runner = AsyncEngine(engine)
        source = EngineKVSource(runner, HandleSigner(), "prefill-test", "127.0.0.1:1")
        servicer = KVService(source, engine.cache, nixl)
        gate = None
        try:
            await _pin(runner, "p")
            handle = await source.issue("p", PROMPT)
            pinned = engine.handoff.export("p").block_ids
            expected = engine.cache.read_blocks(pinned).numpy().tobytes()
            gate, busy = await _held_in_a_step(runner)

            async def pull_and_release() -> None:
                pull = kv_pb2.PullBlocksRequest(handle=handle, layout=layout, blocks_per_chunk=1)
                chunks = [c async for c in servicer.PullBlocks(pull, None)]
                assert b"".join(c.data for c in chunks) == expected
                if nixl is not None:
                    hs = kv_pb2.NixlHandshakeRequest(handle=handle, layout=layout)
                    assert (await servicer.NixlHandshake(hs, None)).block_descriptors
                release = kv_pb2.ReleaseRequest(handle=handle)
                assert (await servicer.Release(release, None)).released
                assert not (await servicer.Release(release, None)).released

            await asyncio.wait_for(pull_and_release(), _ANSWER_S)
            assert not gate.opened.is_set()
            gate.open()
            await busy
            await _settled(engine)
        finally:
            if gate is not None:
                gate.open()
            runner.shutdown()
            if nixl is not None:
                nixl.close()

    asyncio.run(main())
    assert_no_leaks(engine)


def test_a_release_after_expiry_is_refused_and_frees_once(model):
    engine = tiny_engine(model, lease_seconds=0.05)
    freed: Counter[str] = Counter()
    free = engine.blocks.free

    def counting_free(seq) -> None:  # noqa: ANN001
        freed[seq.request_id] += 1
        free(seq)

    engine.blocks.free = counting_free  # type: ignore[method-assign]
    engine.add_request("p", PROMPT, greedy(8), prefill_only=True)
    run_to_completion(engine)
    time.sleep(0.1)
    assert not engine.handoff.release("p")  # expired: what a pull read may be stale
    with pytest.raises(UnknownRequestError):
        engine.handoff.extend("p")
    assert engine.handoff.settle() == ["p"] and engine.handoff.settle() == []
    assert not engine.handoff.release("p")
    assert freed == {"p": 1}
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


def test_releases_racing_expiry_on_a_busy_engine_keep_the_books(model):
    """Releases and extensions from many threads, timed around each lease's deadline, against the
    engine thread expiring leases and reusing their blocks for other requests: every pinned request
    is freed exactly once, and the block books balance after every settling."""
    n = 32
    # One step pins them all, so their leases start together however slow this machine is.
    engine = tiny_engine(model, lease_seconds=0.4, num_kv_blocks=256, max_num_batched_tokens=9 * n)
    for i in range(n):
        engine.add_request(f"p{i}", [(7 * i + k) % 250 + 1 for k in range(9)], greedy(8), prefill_only=True)
    assert len(engine.step()) == n
    deadlines = {f"p{i}": engine.handoff.export(f"p{i}").lease_deadline for i in range(n)}
    offsets = [-0.25, -0.02, -0.005, 0.0, 0.001, 0.005, 0.02, 0.05]  # release time - deadline

    freed: Counter[str] = Counter()
    errors: list[BaseException] = []
    free, settle = engine.blocks.free, engine.handoff.settle

    def counting_free(seq) -> None:  # noqa: ANN001
        freed[seq.request_id] += 1
        free(seq)

    def checked_settle(now: float | None = None) -> list[str]:  # runs on the engine thread
        ended = settle(now)
        try:
            engine.blocks.check_consistency()
        except RuntimeError as e:
            errors.append(e)
        return ended

    engine.blocks.free = counting_free  # type: ignore[method-assign]
    engine.handoff.settle = checked_settle  # type: ignore[method-assign]
    released: list[str] = []
    lock = threading.Lock()

    def releaser(k: int) -> None:
        for i in range(k, n, 4):
            rid = f"p{i}"
            time.sleep(max(0.0, deadlines[rid] + offsets[i % len(offsets)] - time.monotonic()))
            if i % 3 == 0:
                with contextlib.suppress(UnknownRequestError):
                    engine.handoff.extend(rid)  # a pull starting, racing the deadline too
            if engine.handoff.release(rid):
                with lock:
                    released.append(rid)

    async def main() -> None:
        runner = AsyncEngine(engine)
        try:
            threads = [threading.Thread(target=releaser, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            j = 0
            while any(t.is_alive() for t in threads):  # keep the engine stepping and allocating
                await _collect(runner, f"load{j}", [9, 8, 7, j % 200 + 1], 12)
                j += 1
            for t in threads:
                t.join()
            await _settled(engine)
        finally:
            runner.shutdown()

    asyncio.run(main())
    assert not errors, errors
    assert all(freed[f"p{i}"] == 1 for i in range(n)), freed
    assert 0 < len(released) < n  # both outcomes happened: some released, the rest expired
    assert_no_leaks(engine)
