"""The SLO judge: compares each live canary with the baseline over a sliding window, and rolls it
back when it is worse, or steps its weight up when it has stayed healthy.

Rollback when a non-baseline variant with weight > 0 has at least `min_requests` samples and
  - its error rate exceeds the baseline's by more than `max_error_rate_delta` (the baseline needs
    `min_requests` too, unless it has had no errors at all: then the canary's rate alone decides), or
  - its TTFT or TPOT p95 exceeds the baseline's times the ratio (both need `min_requests`).
Its weight then goes to the baseline and the route records why. A route with a rollback record is
left alone (no promotion, no second verdict) until an operator sets it again: no flapping, and one
human decision per incident.

Promotion, when `promote_steps` are set and exactly one canary is live: once `promote_after_s` has
passed since the weights last changed, with `min_requests` canary samples since then and nothing
to roll back, the canary moves to the next step (percent of traffic). At 100 it becomes the baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.routes.spec import RollbackRecord, RouteSpec
from gateway.routes.window import Window, WindowStats

Action = Literal["none", "rollback", "promote"]
Evidence = dict[str, float | int | None]


@dataclass(frozen=True)
class Verdict:
    action: Action
    variant: str | None = None
    reason: str = ""
    evidence: Evidence = field(default_factory=dict)
    spec: RouteSpec | None = None  # the route as it should be after the action

    @classmethod
    def none(cls, reason: str = "") -> Verdict:
        return cls("none", reason=reason)


_EMPTY = WindowStats(0, 0, None, None)


class Judge:
    def evaluate(self, spec: RouteSpec, windows: Mapping[str, Window], now: float) -> Verdict:
        """`windows`: each variant's window by variant name (a missing one counts as empty)."""
        if not spec.judge.enabled:
            return Verdict.none("judge disabled")
        if spec.rolled_back is not None:
            return Verdict.none(f"rolled back {spec.rolled_back.variant}; waiting for an operator")
        # Only what happened since the route last changed: an operator who re-enables a fixed canary
        # must not see it judged on the errors that rolled it back.
        stats = {v.name: _stats(windows, v.name, now, spec.changed_at or None) for v in spec.variants}
        live = [v for v in spec.variants if v.name != spec.baseline and v.weight > 0]
        for canary in live:
            verdict = self._check(spec, canary.name, stats[canary.name], stats[spec.baseline], now)
            if verdict is not None:
                return verdict
        if spec.judge.promote_steps and len(live) == 1:
            return self._promotion(spec, live[0].name, windows, stats[spec.baseline], now)
        return Verdict.none()

    def _check(self, spec: RouteSpec, canary: str, c: WindowStats, b: WindowStats, now: float) -> Verdict | None:
        j = spec.judge
        if c.requests < j.min_requests:
            return None
        evidence: Evidence = {
            "canary_requests": c.requests,
            "canary_error_rate": c.error_rate,
            "canary_ttft_p95_s": c.ttft_p95,
            "canary_tpot_p95_s": c.tpot_p95,
            "baseline_requests": b.requests,
            "baseline_error_rate": b.error_rate,
            "baseline_ttft_p95_s": b.ttft_p95,
            "baseline_tpot_p95_s": b.tpot_p95,
        }
        enough = b.requests >= j.min_requests
        reason = None
        if (enough or b.errors == 0) and c.error_rate > b.error_rate + j.max_error_rate_delta:
            reason = (
                f"error rate {c.error_rate:.3f} > baseline {b.error_rate:.3f} + {j.max_error_rate_delta:g} "
                f"over {c.requests} requests"
            )
        elif enough and _worse(c.ttft_p95, b.ttft_p95, j.max_ttft_p95_ratio):
            reason = f"TTFT p95 {c.ttft_p95:.3f} s > {j.max_ttft_p95_ratio:g} x baseline {b.ttft_p95:.3f} s"
        elif enough and _worse(c.tpot_p95, b.tpot_p95, j.max_tpot_p95_ratio):
            reason = f"TPOT p95 {c.tpot_p95:.4f} s > {j.max_tpot_p95_ratio:g} x baseline {b.tpot_p95:.4f} s"
        if reason is None:
            return None
        return Verdict("rollback", canary, reason, evidence, rolled_back(spec, canary, reason, evidence, now))

    def _promotion(
        self, spec: RouteSpec, canary: str, windows: Mapping[str, Window], b: WindowStats, now: float
    ) -> Verdict:
        j = spec.judge
        share = spec.share(spec.variant(canary))
        step = next((s for s in j.promote_steps if s > share + 1e-9), None)
        if step is None:
            return Verdict.none(f"{canary} is at its last step")
        healthy_for = now - spec.changed_at
        if healthy_for < j.promote_after_s:
            return Verdict.none(f"{canary} changed {healthy_for:.0f} s ago; promotes after {j.promote_after_s:g} s")
        since_change = _stats(windows, canary, now, since=spec.changed_at)
        if since_change.requests < j.min_requests or b.requests < j.min_requests:
            return Verdict.none(f"too few requests to promote {canary}")
        reason = f"healthy for {healthy_for:.0f} s over {since_change.requests} requests: {share:g}% -> {step}%"
        evidence: Evidence = {"canary_requests": since_change.requests, "from_percent": share, "to_percent": step}
        return Verdict("promote", canary, reason, evidence, promoted(spec, canary, step, now))


def rolled_back(spec: RouteSpec, variant: str, reason: str, evidence: Evidence, now: float) -> RouteSpec:
    """The route with `variant`'s weight given to the baseline, and the record of why."""
    moved = spec.variant(variant).weight

    def weight(name: str, current: int) -> int:
        if name == variant:
            return 0
        return current + moved if name == spec.baseline else current

    variants = [v.model_copy(update={"weight": weight(v.name, v.weight)}) for v in spec.variants]
    record = RollbackRecord(variant=variant, reason=reason, at=now, evidence=evidence)
    return spec.model_copy(update={"variants": variants, "rolled_back": record, "changed_at": now})


def promoted(spec: RouteSpec, variant: str, percent: int, now: float) -> RouteSpec:
    """The route with `variant` at `percent` of traffic and the baseline at the rest; at 100 the
    variant becomes the baseline."""

    def weight(name: str) -> int:
        if name == variant:
            return percent
        return 100 - percent if name == spec.baseline else 0

    variants = [v.model_copy(update={"weight": weight(v.name)}) for v in spec.variants]
    baseline = variant if percent == 100 else spec.baseline
    return spec.model_copy(update={"variants": variants, "baseline": baseline, "changed_at": now})


def _stats(windows: Mapping[str, Window], name: str, now: float, since: float | None = None) -> WindowStats:
    window = windows.get(name)
    return _EMPTY if window is None else window.stats(now, since)


def _worse(canary: float | None, baseline: float | None, ratio: float) -> bool:
    return canary is not None and baseline is not None and canary > baseline * ratio
