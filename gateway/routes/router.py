"""The gateway's side of model routes: which served model a request for a route name goes to, what
each variant's requests did, and the background loop that re-reads the routes and runs the judge.

`resolve` and `record` do no I/O (they read and feed in-memory state on the event loop); the store is
read and written only by `run`, in a thread. The clock is wall time: `changed_at` in a route is
written by the CLI and by other replicas.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import redis
from opentelemetry import trace

from gateway.routes.assign import choose, shadowed
from gateway.routes.judge import Judge, Verdict
from gateway.routes.metrics import (
    ROUTE_PROMOTIONS,
    ROUTE_REQUESTS,
    ROUTE_ROLLBACKS,
    ROUTE_TPOT,
    ROUTE_TTFT,
    ROUTE_WEIGHT,
    SHADOW_REQUESTS,
)
from gateway.routes.spec import RouteSpec
from gateway.routes.store import Clock, RouteStore
from gateway.routes.window import Outcome, Window

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
_STORE_ERRORS = (redis.RedisError, OSError, ValueError)


@dataclass(frozen=True)
class Assignment:
    route: str
    variant: str
    model: str  # the served model the request goes to
    shadow_model: str | None = None  # also send a copy here (answer discarded) when set
    revision: int = 0


class Router:
    def __init__(
        self,
        store: RouteStore,
        judge: Judge | None = None,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        max_samples: int = 10_000,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.store = store
        self._tracer = tracer or _tracer
        self.judge = judge or Judge()
        self._clock = clock
        self._rng = rng or random.Random()
        self._max_samples = max_samples
        self._routes: dict[str, RouteSpec] = {}
        # Keyed by model too: a variant pointed at another model starts with no history.
        self._windows: dict[tuple[str, str, str], Window] = {}
        self._gauged: set[tuple[str, str]] = set()

    # -- the request path (no I/O) ---------------------------------------------------------------
    def resolve(self, model: str, user_key: str | None, request_id: str) -> Assignment | None:
        """None when `model` is not a route name (serve it as a model id)."""
        spec = self._routes.get(model)
        if spec is None:
            return None
        variant = choose(spec, user_key, self._rng)
        shadow = spec.shadow.model if spec.shadow is not None and shadowed(spec, request_id) else None
        return Assignment(spec.name, variant.name, variant.model, shadow, spec.revision)

    def record(
        self, assignment: Assignment, ok: bool, ttft_s: float | None = None, tpot_s: float | None = None
    ) -> None:
        """A routed request ended: `ok` False for failures the variant is answerable for."""
        route, variant = assignment.route, assignment.variant
        ROUTE_REQUESTS.labels(route, variant, "ok" if ok else "error").inc()
        if ttft_s is not None:
            ROUTE_TTFT.labels(route, variant).observe(ttft_s)
        if tpot_s is not None:
            ROUTE_TPOT.labels(route, variant).observe(tpot_s)
        window = self._windows.get((route, variant, assignment.model))
        if window is not None:  # None: the route changed under the request; its outcome no longer applies
            window.add(Outcome(self._clock(), ok, ttft_s, tpot_s))

    def record_shadow(self, assignment: Assignment, ok: bool) -> None:
        SHADOW_REQUESTS.labels(assignment.route, "ok" if ok else "error").inc()

    def public_names(self) -> list[str]:
        """The route names, for /v1/models."""
        return sorted(self._routes)

    def get(self, name: str) -> RouteSpec | None:
        return self._routes.get(name)

    # -- the background loop ------------------------------------------------------------------------
    def install(self, routes: dict[str, RouteSpec]) -> None:
        """Serve these routes from now on, keeping the history of variants that still exist."""
        windows: dict[tuple[str, str, str], Window] = {}
        for spec in routes.values():
            for v in spec.variants:
                key = (spec.name, v.name, v.model)
                window = self._windows.get(key) or Window(spec.judge.window_s, self._max_samples)
                window.window_s = spec.judge.window_s
                windows[key] = window
        gauged = {(spec.name, v.name) for spec in routes.values() for v in spec.variants}
        for labels in self._gauged - gauged:
            ROUTE_WEIGHT.remove(*labels)
        for spec in routes.values():
            for v in spec.variants:
                ROUTE_WEIGHT.labels(spec.name, v.name).set(v.weight)
        self._routes, self._windows, self._gauged = dict(routes), windows, gauged

    def verdicts(self) -> list[tuple[RouteSpec, Verdict, RouteSpec]]:
        """The judge's verdicts that change a route: (the route judged, the verdict, the route after)."""
        now = self._clock()
        out = []
        for spec in self._routes.values():
            windows = {v.name: self._windows[(spec.name, v.name, v.model)] for v in spec.variants}
            verdict = self.judge.evaluate(spec, windows, now)
            if verdict.spec is not None:
                out.append((spec, verdict, verdict.spec))
        return out

    async def tick(self) -> list[Verdict]:
        """Re-read the routes, judge them and write what the judge decided; the verdicts that landed."""
        try:
            self.install(await asyncio.to_thread(self.store.all))
        except _STORE_ERRORS as e:
            log.warning("keeping the routes last read; reading them failed: %s", e)
        landed = []
        for spec, verdict, after in self.verdicts():
            try:
                ok = await asyncio.to_thread(self.store.apply, after, spec.revision)
            except _STORE_ERRORS as e:
                log.warning(
                    "route %s: could not write the judge's %s of %s: %s", spec.name, verdict.action, verdict.variant, e
                )
                continue
            if not ok:
                log.info("route %s changed before the judge's %s landed; judging it anew", spec.name, verdict.action)
                continue
            self.install({**self._routes, spec.name: after.model_copy(update={"revision": spec.revision + 1})})
            self._announce(spec.name, verdict)
            landed.append(verdict)
        return landed

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bug in one tick must not freeze every route until a restart
                log.exception("the route loop's tick failed; trying again in %g s", interval_s)
            await asyncio.sleep(interval_s)

    def _announce(self, route: str, verdict: Verdict) -> None:
        if verdict.action == "rollback":
            log.warning("route %s: rolled back variant %s: %s", route, verdict.variant, verdict.reason)
            ROUTE_ROLLBACKS.labels(route, verdict.variant).inc()
            attributes = {
                "kvrelay.route.name": route,
                "kvrelay.route.variant": verdict.variant or "",
                "kvrelay.route.reason": verdict.reason,
            }
            # The judge runs outside any request: its decision is a trace of its own.
            with self._tracer.start_as_current_span("route_rollback", attributes=attributes) as span:
                span.add_event("kvrelay.route.rollback", attributes)
        else:
            log.info("route %s: promoted variant %s: %s", route, verdict.variant, verdict.reason)
            ROUTE_PROMOTIONS.labels(route, verdict.variant).inc()
