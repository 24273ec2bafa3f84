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


class ModelFilter:
    """The worker serves the request's model (loaded or not: a worker loads on demand)."""

    type_name = "model"

    def keep(self, c: Candidate, req: RequestInfo) -> bool:
        return c.serves_model


class PoolFilter:
    """The worker is in the pool the request's workload class is kept to, if it is kept to one."""

    type_name = "pool"

    def keep(self, c: Candidate, req: RequestInfo) -> bool:
        return c.in_pool


class LayoutFilter:
    """The worker holds the request's model with the KV layout the pool agreed on for it."""

    type_name = "layout"

    def keep(self, c: Candidate, req: RequestInfo) -> bool:
        return c.layout_ok


class KVFitFilter:
    """A decode worker must have free blocks for the request's KV now (its last Stats, less the
    blocks this gateway promised it since), or the import would wait out the prefill lease."""

    type_name = "kv-fit"

    def keep(self, c: Candidate, req: RequestInfo) -> bool:
        if c.role != "decode" or not c.model_loaded:  # a model loaded for this request starts empty
            return True
        return c.free_blocks - c.pending_blocks >= req.blocks_needed


class StreamLimitFilter:
    """A decode worker takes at most `stream_limit` streams: each one more slows every step of its
    batch, so past the limit new work waits at the gateway (429) instead of slowing admitted streams."""

    type_name = "stream-limit"

    def keep(self, c: Candidate, req: RequestInfo) -> bool:
        return c.role != "decode" or not c.stream_limit or c.streams < c.stream_limit


FILTERS = {
    f.type_name: f
    for f in (HealthFilter, NotDrainingFilter, ModelFilter, PoolFilter, LayoutFilter, KVFitFilter, StreamLimitFilter)
}
