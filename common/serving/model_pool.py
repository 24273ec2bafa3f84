"""The models one worker serves: loaded on demand within a memory budget, the least recently used
evicted to make room, and never one that is in use.

"In use" means a call is inside it (a prefill, a decode stream, a KV pull) or its engine still holds
state (queued or running requests, KV pinned for a decode worker to pull). Each model has its own
engine, KV cache and layout; all of them report cache changes to one event log, so gateways follow
one stream per worker. Loads run one at a time, off the event loop, while calls to models already
loaded go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from common.config import EngineConfig
from common.engine.async_engine import AsyncEngine
from common.engine.factory import build_engine, resolve_quantization
from common.errors import CacheFullError, ModelLoadError
from common.kv.events import KVEventLog
from common.memory import release_freed_memory
from common.model.footprint import estimate_bytes, weight_bytes
from common.model_source import resolve_model
from common.serving.metrics import MODEL_LOAD_SECONDS

log = logging.getLogger(__name__)
_EVICT_POLL_S = 0.05
MB = 2**20


class ModelNotServedError(ModelLoadError):
    """The request names a model this worker does not serve (or no longer holds, for KV): the worker
    is the wrong one for it (FAILED_PRECONDITION), not missing a request (NOT_FOUND)."""


class ModelBusyError(CacheFullError):
    """No room to load a model now: the budget is held by models that are in use."""


@dataclass
class HostedModel:
    model_id: str
    engine: AsyncEngine
    services: object  # what the worker's role built around this engine (its servicers)
    footprint_bytes: int
    active: int = 0  # calls inside it now
    evicting: bool = False  # chosen to make room: takes no new calls that would need it loaded
    last_used: float = field(default_factory=time.monotonic)

    async def in_use(self) -> bool:
        return self.active > 0 or (await self.engine.stats())["sequences"] > 0


@dataclass
class _Known:
    """What the pool knows of a model it serves, loaded or not."""

    spec: str  # as configured: a repository id or a path
    footprint_bytes: int = 0  # measured at the last load, else estimated from the file's headers
    loads: int = 0
    evictions: int = 0
    layout: object | None = None  # its KV layout once loaded
    max_model_len: int = 0


MakeServices = Callable[[AsyncEngine], object]


class ModelPool:
    def __init__(
        self,
        specs: list[str],
        config: EngineConfig | None = None,
        make_services: MakeServices | None = None,
        budget_bytes: int | None = None,
        load_timeout_s: float = 60.0,
        events: KVEventLog | None = None,
        progress: bool = False,
    ) -> None:
        self.config = config or EngineConfig()
        self.make_services = make_services or (lambda engine: None)
        self.budget_bytes = budget_bytes
        self.load_timeout_s = load_timeout_s
        self.events = events if events is not None else KVEventLog()
        self.progress = progress
        self.known: dict[str, _Known] = {}
        for spec in specs:
            source = resolve_model(spec)
            if source.model_id in self.known:
                raise ValueError(
                    f"model {source.model_id!r} is listed twice ({self.known[source.model_id].spec!r}, {spec!r})"
                )
            # Pinned to the version found now: a version added later must not be loaded under this id.
            self.known[source.model_id] = _Known(source.pinned or spec)
        self.loaded: dict[str, HostedModel] = {}
        self._load_lock = asyncio.Lock()
        self._loading: dict[str, asyncio.Task] = {}
        self._waiters: dict[str, list[asyncio.Future[HostedModel]]] = {}

    @property
    def default(self) -> str:
        """The model of calls that name none: the first one configured."""
        if not self.known:
            raise ValueError("a worker serves at least one model")
        return next(iter(self.known))

    def adopt(self, engine: AsyncEngine, services: object = None) -> HostedModel:
        """Serve an engine built elsewhere (tests, one-process tools); never evicted for budget's
        sake unless idle, like any other. The first adopted engine's event log becomes the pool's."""
        if not self.known and not self.loaded:
            self.events = engine.kv_events
        model_id = engine.layout.model_id
        self.known[model_id] = _Known("", layout=engine.layout, max_model_len=engine.max_model_len, loads=1)
        hosted = HostedModel(model_id, engine, services, 0)
        self.loaded[model_id] = hosted
        return hosted

    # -- what calls use ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, model_id: str = "", load: bool = True) -> AsyncIterator[HostedModel]:
        """The model for one call, loaded first if `load` (evicting others as the budget needs);
        it cannot be evicted until the call ends and its engine holds nothing."""
        hosted = await self._acquire(model_id or self.default, load)
        try:
            yield hosted
        finally:
            hosted.active -= 1
            hosted.last_used = time.monotonic()

    async def preload(self, model_ids: list[str] | None = None) -> None:
        """Load `model_ids` now (may evict earlier ones); None: every model in order while they fit
        the budget together (the first always)."""
        if model_ids is None:
            model_ids = []
            total = 0
            for model_id in self.known:
                total += await self._estimate(model_id)
                if model_ids and self.budget_bytes and total > self.budget_bytes:
                    break
                model_ids.append(model_id)
        for model_id in model_ids:
            async with self.use(model_id):
                pass

    def engines(self) -> dict[str, AsyncEngine]:
        return {m: h.engine for m, h in list(self.loaded.items())}

    def used_bytes(self) -> int:
        return sum(h.footprint_bytes for h in list(self.loaded.values()))

    async def model_stats(self) -> list[dict]:
        """One entry per served model, in configured order (see ModelStats in worker.proto)."""
        out = []
        for model_id, k in self.known.items():
            h = self.loaded.get(model_id)
            s = await h.engine.stats() if h else {}
            out.append(
                {
                    "model_id": model_id,
                    "loaded": h is not None,
                    "layout": k.layout,
                    "waiting": s.get("waiting", 0),
                    "running": s.get("running", 0),
                    "pinned": s.get("pinned", 0),
                    "free_blocks": s.get("free_blocks", 0),
                    "total_blocks": s.get("total_blocks", 0),
                    "max_model_len": k.max_model_len,
                    "footprint_bytes": h.footprint_bytes if h else k.footprint_bytes,
                    "loads": k.loads,
                    "evictions": k.evictions,
                }
            )
        return out

    async def shutdown(self) -> None:
        for model_id in list(self.loaded):
            await self._unload(model_id, evicted=False)

    # -- loading and evicting -----------------------------------------------------------------------
    async def _acquire(self, model_id: str, load: bool) -> HostedModel:
        if model_id not in self.known:
            raise ModelNotServedError(f"this worker does not serve model {model_id!r}; it serves {list(self.known)}")
        hosted = self.loaded.get(model_id)
        # A model being evicted takes no new calls that would need it loaded (they queue for their
        # turn), but its KV calls go in: pulls of what it pinned are what it is waiting for.
        if hosted is not None and (not hosted.evicting or not load):
            hosted.active += 1
            hosted.last_used = time.monotonic()
            return hosted
        if not load:
            raise ModelNotServedError(f"model {model_id!r} is not loaded here (its KV went with it)")
        # Wait for the model to be handed over: the load enters every waiter into the model before it
        # lets another load run, so no other load can evict it between the two (which would livelock).
        ticket: asyncio.Future[HostedModel] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(model_id, []).append(ticket)
        if model_id not in self._loading:  # the pool owns the load: a caller that gives up does not stop it
            task = asyncio.get_running_loop().create_task(self._load(model_id))
            self._loading[model_id] = task
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its waiters got the error
        try:
            return await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                ticket.result().active -= 1  # handed over as the caller left: give the place back
            elif ticket in self._waiters.get(model_id, []):
                self._waiters[model_id].remove(ticket)
            raise

    def _hand_over(self, model_id: str, hosted: HostedModel | None, error: BaseException | None = None) -> None:
        for ticket in self._waiters.pop(model_id, []):
            if ticket.done():
                continue
            if hosted is None:
                ticket.set_exception(error or ModelBusyError(f"model {model_id!r} could not be loaded"))
            else:
                hosted.active += 1
                hosted.last_used = time.monotonic()
                ticket.set_result(hosted)

    async def _load(self, model_id: str) -> None:
        try:
            await self._load_and_hand_over(model_id)
        finally:
            self._loading.pop(model_id, None)  # at once, with no await after the hand-over

    async def _load_and_hand_over(self, model_id: str) -> None:
        try:
            async with self._load_lock:  # one load at a time; calls to loaded models go on meanwhile
                hosted = self.loaded.get(model_id)
                if hosted is not None:  # marked for eviction and wanted again: it stays
                    hosted.evicting = False
                    self._hand_over(model_id, hosted)
                    return
                started = time.monotonic()
                hosted = await self._build(model_id)
                self._hand_over(model_id, hosted)
        except BaseException as e:
            self._hand_over(model_id, None, e)
            raise
        MODEL_LOAD_SECONDS.labels(model_id).observe(time.monotonic() - started)
        log.info(
            "loaded model %s in %.1fs (%.0f MB; %.0f MB of %s in use)",
            model_id,
            time.monotonic() - started,
            hosted.footprint_bytes / MB,
            self.used_bytes() / MB,
            f"{self.budget_bytes / MB:.0f} MB" if self.budget_bytes else "no budget",
        )
        if self.budget_bytes and self.used_bytes() > self.budget_bytes:
            log.warning("model %s is larger than estimated: the pool is over its budget", model_id)

    async def _build(self, model_id: str) -> HostedModel:
        """Make room, then build the model's engine and services (under the load lock)."""
        known = self.known[model_id]
        config = self.config.model_copy(update={"model": known.spec})
        if self.budget_bytes:
            await self._make_room(model_id, await self._estimate(model_id))
        engine = await asyncio.to_thread(build_engine, config, self.progress, self.events, model_id)
        runner = AsyncEngine(engine)
        try:
            footprint = weight_bytes(engine.runner.model) + engine.cache.tensor.nbytes
            hosted = HostedModel(model_id, runner, self.make_services(runner), footprint)
        except BaseException:
            runner.shutdown()
            raise
        known.footprint_bytes, known.layout, known.max_model_len = footprint, engine.layout, engine.max_model_len
        known.loads += 1
        self.loaded[model_id] = hosted
        return hosted

    async def _estimate(self, model_id: str) -> int:
        known = self.known[model_id]
        if not known.footprint_bytes:
            config = self.config.model_copy(update={"model": known.spec})
            source = resolve_model(known.spec)
            quantization = resolve_quantization(config, source)
            known.footprint_bytes = await asyncio.to_thread(estimate_bytes, source, config, quantization)
        return known.footprint_bytes

    async def _make_room(self, model_id: str, need: int) -> None:
        """Evict idle models, least recently used first, until `need` more bytes fit; wait for one
        to become idle when none is, up to `load_timeout_s`."""
        if not self.budget_bytes:
            return
        if need > self.budget_bytes:
            raise ModelBusyError(
                f"model {model_id!r} needs {need / MB:.0f} MB, more than this worker's budget of "
                f"{self.budget_bytes / MB:.0f} MB"
            )
        deadline = time.monotonic() + self.load_timeout_s
        try:
            while self.loaded and self.used_bytes() + need > self.budget_bytes:
                by_age = sorted(self.loaded.values(), key=lambda h: h.last_used)
                idle = [h for h in by_age if not await h.in_use()]
                if idle:
                    victim = idle[0]
                    if victim.active == 0:  # checked again: a call may have come in while we looked
                        await self._unload(victim.model_id, evicted=True)
                    continue
                # Every model is busy: the least recently used one takes no new calls from now on, so
                # steady traffic to it cannot keep this load waiting forever.
                by_age[0].evicting = True
                if time.monotonic() > deadline:
                    raise ModelBusyError(
                        f"cannot load model {model_id!r}: the memory budget ({self.budget_bytes / MB:.0f} MB) is "
                        f"held by models in use ({', '.join(self.loaded)}) for {self.load_timeout_s:.0f}s"
                    )
                await asyncio.sleep(_EVICT_POLL_S)
        finally:
            for h in self.loaded.values():  # those still here serve on
                h.evicting = False

    async def _unload(self, model_id: str, evicted: bool) -> None:
        hosted = self.loaded.pop(model_id)
        # Gateways must stop routing to this model's cached prefixes on this worker.
        for h in await hosted.engine.call(hosted.engine.cached_block_hashes):
            self.events.append("removed", h)
        close = getattr(hosted.services, "close", None)
        if close is not None:
            result = close()
            if inspect.isawaitable(result):
                await result
        hosted.engine.shutdown()
        if evicted:
            self.known[model_id].evictions += 1
            log.info("evicted model %s (least recently used; %.0f MB freed)", model_id, hosted.footprint_bytes / MB)
        del hosted
        release_freed_memory()
