"""Shared helpers of the route tests: a fake clock, a two-variant route, windows fed with outcomes."""

from __future__ import annotations

from prometheus_client import REGISTRY

from gateway.routes.spec import JudgeSpec, RouteSpec, Variant
from gateway.routes.window import Outcome, Window


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def route(canary_weight: int = 10, **judge: object) -> RouteSpec:
    return RouteSpec(
        name="chat",
        variants=[
            Variant(name="stable", model="model-a", weight=100 - canary_weight),
            Variant(name="canary", model="model-b", weight=canary_weight),
        ],
        judge=JudgeSpec(**judge),
    )


def feed(window: Window, at: float, n: int, errors: int = 0, ttft: float = 0.1, tpot: float = 0.02) -> None:
    for i in range(n):
        window.add(Outcome(at, ok=i >= errors, ttft_s=ttft, tpot_s=tpot))


def windows_for(spec: RouteSpec) -> dict[str, Window]:
    return {v.name: Window(spec.judge.window_s) for v in spec.variants}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
