"""Filters: a candidate that fails one is never chosen."""

from __future__ import annotations

from gateway.scheduling.types import Candidate, RequestInfo


class HealthFilter:
    type_name = "health"

    def keep(self, c: Candidate, req: RequestInfo) -> bool:
        return c.healthy


class NotDrainingFilter:
    type_name = "not-draining"

    def keep(self, c: Candidate, req: RequestInfo) -> bool:
        return not c.draining


class LayoutFilter:
    """The worker serves the gateway's model with the KV layout the pool agreed on."""

    type_name = "layout"

    def keep(self, c: Candidate, req: RequestInfo) -> bool:
        return c.layout_ok


FILTERS = {f.type_name: f for f in (HealthFilter, NotDrainingFilter, LayoutFilter)}
