"""Model routes: a public model name split over served models for canary, A/B and shadow traffic,
with an SLO judge that rolls a worse canary back and steps a healthy one up.

spec (what a route is) -> assign (which variant a request gets) -> window (what each variant did)
-> judge (rollback or promote) -> store (file or Redis, compare-and-set) -> router (the gateway's
entry point and background loop)."""

from gateway.routes.judge import Judge, Verdict
from gateway.routes.router import Assignment, Router
from gateway.routes.spec import JudgeSpec, RollbackRecord, RouteSpec, Shadow, Variant
from gateway.routes.store import MemoryRouteStore, RedisRouteStore, RouteStore

__all__ = [
    "Assignment",
    "Judge",
    "JudgeSpec",
    "MemoryRouteStore",
    "RedisRouteStore",
    "RollbackRecord",
    "RouteSpec",
    "RouteStore",
    "Router",
    "Shadow",
    "Variant",
    "Verdict",
]
