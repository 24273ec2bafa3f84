"""The engine behind an asyncio API, driven by one dedicated thread.

Services submit requests and iterate their outputs with `async for`. Engine methods run on the
engine thread (commands are queued and executed between steps), so the engine needs no locks,
and torch's compute releases the GIL so the event loop stays responsive. A step that raises fails
only the requests it ran; the loop carries on. The exceptions answer at once, never behind a long
step: stats (plain reads) and the lease bookkeeping of pinned KV (export, extend, release), whose
table has its own lock; the engine thread frees the blocks of ended leases between steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from common.engine.llm_engine import LLMEngine
from common.engine.outputs import KVExport, RequestOutput
from common.engine.sampling import SamplingParams
from common.errors import EngineStoppedError
from common.kv.cache import KVCache
from common.kv.events import KVEventLog
from common.kv.layout import KVLayout

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_WAIT_S = 0.05


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], concurrent.futures.Future]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvrelay-engine", daemon=True)
        self._thread.start()

    # -- public API (any event loop) ------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, prefill_only: bool = False
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes (or pins, for prefill_only). Leaving the loop
        early aborts the request and frees its blocks."""
        stream = self._open_stream(request_id)
        try:
            await self.call(lambda: self.engine.add_request(request_id, prompt_token_ids, params, prefill_only))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        async for out in self._drain(request_id, stream):
            yield out

    async def decode_imported(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of a request whose KV was imported (begin_import + filled blocks)."""
        stream = self._open_stream(request_id)
        try:
            final = await self.call(lambda: self.engine.finish_import(request_id))
        except BaseException:
            self._streams.pop(request_id, None)
            await self.abort(request_id)
            raise
        if final is not None:
            self._streams.pop(request_id, None)
            yield final
            return
        async for out in self._drain(request_id, stream):
            yield out

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; its stream (if any) ends with finish_reason "abort"."""
        aborted = await self.call(lambda: self.engine.abort(request_id))
        if aborted:
            self._publish(RequestOutput(request_id, finished=True, finish_reason="abort"))
        return aborted

    # Lease bookkeeping answers at once, never behind a step (see common/engine/leases.py).
    async def release(self, request_id: str) -> bool:
        released = self.engine.handoff.release(request_id)
        if released:
            self._wake()  # an idle engine thread frees the blocks now, not at its next timeout
        return released

    async def export_kv(self, request_id: str) -> KVExport:
        return self.engine.handoff.export(request_id)

    async def extend_lease(self, request_id: str) -> KVExport:
        return self.engine.handoff.extend(request_id)

    async def begin_import(
        self, request_id: str, prompt_token_ids: Sequence[int], first_token: int, params: SamplingParams
    ) -> list[int]:
        return await self.call(
            lambda: self.engine.handoff.begin_import(request_id, prompt_token_ids, first_token, params)
        )

    # -- what services may read of the engine (its P/D port), without reaching inside it ------
    @property
    def layout(self) -> KVLayout:
        return self.engine.layout

    @property
    def cache(self) -> KVCache:
        """The KV cache tensor's owner: transports read and write its blocks."""
        return self.engine.cache

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def lease_seconds(self) -> float:
        return self.engine.handoff.lease_seconds

    @property
    def kv_events(self) -> KVEventLog:
        return self.engine.events

    def cached_block_hashes(self) -> list[int]:
        return self.engine.blocks.cached_block_hashes()

    async def stats(self) -> dict[str, int]:
        """Read directly, not between steps: health checks must not wait for a long prefill step."""
        return self.engine.stats()

    def stats_now(self) -> dict[str, int]:
        """The same counters for a caller on another thread (a metrics scrape)."""
        return self.engine.stats()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the engine thread between steps and return its result (or raise its error)."""
        if self._stop.is_set():
            raise EngineStoppedError("the engine has stopped (its model was unloaded, or the worker is stopping)")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return await asyncio.wrap_future(fut)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        while True:  # nothing will run what is still queued: fail it rather than leave callers waiting
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineStoppedError("the engine stopped before running this call"))

    def _wake(self) -> None:
        self._commands.put((lambda: None, concurrent.futures.Future()))

    # -- streams --------------------------------------------------------------------------------
    def _open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        return q

    async def _drain(self, request_id: str, q: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        done = False
        try:
            while True:
                out = await q.get()
                done = out.finished or out.pinned
                yield out
                if done:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not done:
                # The consumer went away (client disconnect, cancellation): free the blocks now.
                self._commands.put((lambda: self.engine.abort(request_id), concurrent.futures.Future()))

    def _publish(self, out: RequestOutput) -> None:
        entry = self._streams.get(out.request_id)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, out)

    # -- engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            self.engine.handoff.settle()
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step must not take the other requests down
                log.exception("engine step failed")
                running = [s.request_id for s in self.engine.scheduler.running]
                outputs = self.engine.fail(running, f"engine step failed: {type(e).__name__}: {e}")
            for out in outputs:
                self._publish(out)

    def _run_commands(self, block: bool) -> None:
        timeout = None
        if block:
            deadline = self.engine.handoff.next_deadline()
            timeout = _IDLE_WAIT_S if deadline is None else max(0.0, min(_IDLE_WAIT_S, deadline - time.monotonic()))
        while True:
            try:
                fn, fut = self._commands.get(block=block, timeout=timeout) if block else self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)
