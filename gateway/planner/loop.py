"""The planner's loop: every interval read the signals, ask the policy, and apply through the
adapter what changed, logging one line per change. A failing gateway or platform costs one tick,
never the planner: the next tick reads everything afresh."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx

from gateway.planner.adapters import AdapterError, ScaleAdapter
from gateway.planner.policy import Policy, Recommendation
from gateway.planner.signals import Signals

log = logging.getLogger(__name__)


class PlanLoop:
    def __init__(self, read_signals: Callable[[], Signals | None], policy: Policy, adapter: ScaleAdapter) -> None:
        self._read = read_signals
        self._policy = policy
        self._adapter = adapter

    def current(self, signals: Signals | None) -> dict[str, int]:
        """The adapter's sizes; for a pool it cannot tell, the healthy workers the gateways see."""
        sizes = self._adapter.current()
        for role, pool in (signals.pools if signals is not None else {}).items():
            sizes.setdefault(role, pool.workers_up)
        return sizes

    def tick(self) -> dict[str, Recommendation]:
        signals = self._read()
        recs = self._policy.tick(signals, self.current(signals))
        for rec in recs.values():
            log.debug("%s", rec.line())
        changes = {role: rec.size for role, rec in recs.items() if rec.changed}
        if changes:
            self._adapter.apply(changes)
            for role in changes:
                log.info("%s", recs[role].line())
        return recs

    def run(
        self,
        interval_s: float,
        ticks: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Tick every interval_s (on a fixed schedule, so a slow tick does not drift the next), for
        `ticks` ticks or until interrupted."""
        due = clock()
        done = 0
        while True:
            try:
                self.tick()
            except (AdapterError, httpx.HTTPError, OSError) as e:
                log.error("planner tick failed, trying again next interval: %s", e)
            done += 1
            if ticks is not None and done >= ticks:
                return
            due = max(due + interval_s, clock())  # after a stall, resume the schedule rather than burst
            sleep(max(0.0, due - clock()))
