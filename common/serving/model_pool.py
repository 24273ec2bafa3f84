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
import ctypes
import gc
import inspect
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from common.config import EngineConfig
from common.engine.async_engine import AsyncEngine
from common.engine.factory import build_engine, resolve_quantization
from common.errors import CacheFullError, UnknownRequestError
from common.kv.events import KVEventLog
from common.model.footprint import estimate_bytes, weight_bytes
from common.model_source import resolve_model
from common.serving.metrics import MODEL_LOAD_SECONDS

log = logging.getLogger(__name__)
_EVICT_POLL_S = 0.05
MB = 2**20


class ModelNotServedError(UnknownRequestError):
    """The request names a model this worker does not serve (or no longer holds, for KV)."""


class ModelBusyError(CacheFullError):
    """No room to load a model now: the budget is held by models that are in use."""


@dataclass
class HostedModel:
    model_id: str
    engine: AsyncEngine
    services: object  # what the worker's role built around this engine (its servicers)
    footprint_bytes: int
    active: int = 0  # calls inside it now
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
            model_id = resolve_model(spec).model_id
            if model_id in self.known:
                raise ValueError(f"model {model_id!r} is listed twice ({self.known[model_id].spec!r}, {spec!r})")
            self.known[model_id] = _Known(spec)
        self.loaded: dict[str, HostedModel] = {}
        self._load_lock = asyncio.Lock()

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
        if hosted is None:
            if not load:
                raise ModelNotServedError(f"model {model_id!r} is not loaded here (its KV went with it)")
            async with self._load_lock:  # one load at a time; calls to loaded models go on meanwhile
                hosted = self.loaded.get(model_id) or await self._load(model_id)
        hosted.active += 1
        hosted.last_used = time.monotonic()
        return hosted

    async def _load(self, model_id: str) -> HostedModel:
        known = self.known[model_id]
        config = self.config.model_copy(update={"model": known.spec})
        if self.budget_bytes:
            await self._make_room(model_id, await self._estimate(model_id))
        started = time.monotonic()
        engine = await asyncio.to_thread(build_engine, config, self.progress, self.events)
        runner = AsyncEngine(engine)
        footprint = weight_bytes(engine.runner.model) + engine.cache.tensor.nbytes
        hosted = HostedModel(model_id, runner, self.make_services(runner), footprint)
        known.footprint_bytes, known.layout, known.max_model_len = footprint, engine.layout, engine.max_model_len
        known.loads += 1
        self.loaded[model_id] = hosted
        MODEL_LOAD_SECONDS.labels(model_id).observe(time.monotonic() - started)
        log.info(
            "loaded model %s in %.1fs (%.0f MB; %.0f MB of %s in use)",
            model_id,
            time.monotonic() - started,
            footprint / MB,
            self.used_bytes() / MB,
            f"{self.budget_bytes / MB:.0f} MB" if self.budget_bytes else "no budget",
        )
        if self.budget_bytes and self.used_bytes() > self.budget_bytes:
            log.warning("model %s is larger than estimated: the pool is over its budget", model_id)
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
        while self.loaded and self.used_bytes() + need > self.budget_bytes:
            idle = [h for h in list(self.loaded.values()) if not await h.in_use()]
            if idle:
                victim = min(idle, key=lambda h: h.last_used)
                if victim.active == 0:  # checked again: a call may have come in while we looked
                    await self._unload(victim.model_id, evicted=True)
                continue
            if time.monotonic() > deadline:
                raise ModelBusyError(
                    f"cannot load model {model_id!r}: the memory budget ({self.budget_bytes / MB:.0f} MB) is held "
                    f"by models in use ({', '.join(self.loaded)}) for {self.load_timeout_s:.0f}s"
                )
            await asyncio.sleep(_EVICT_POLL_S)

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
        gc.collect()
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
