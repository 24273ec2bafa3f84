"""The pool planner's policy: from one tick's Signals and the pools' sizes, the size each pool
needs, then damped (damping.py) into a recommendation. Pure: no I/O, no clock; time is ticks.

A pool's need is proportional, as an HPA's is: every signal gives a ratio observed / target per
healthy worker, the largest ratio r wins, and the pool needs ceil(healthy workers * r), with no
change while r is within `tolerance` of 1. Prefill: prompts running and prompts queued per
worker, and TTFT p95 against its SLO. Decode: sequences (running and queued) per worker, KV
usage, and TPOT p95 against its SLO. Running work and KV usage grow linearly with load, so their
need is trusted whole; a queue or a latency explodes near saturation, so growth on one of those
is bounded per change. A pool shrinks only while its latency is well under the SLO (or unknown
because nothing was served)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.planner.damping import Damper
from gateway.planner.signals import ROLES, PoolSignals, Signals


@dataclass(frozen=True)
class PolicyConfig:
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.1
    prefill_waiting_target: float = 2.0  # prompts queued per prefill worker
    prefill_running_target: float = 0.75  # prompts being prefilled per worker (a batching worker counts each)
    decode_running_target: float = 32.0  # sequences decoding or queued per decode worker
    decode_kv_target: float = 0.7  # mean fraction of KV blocks in use
    min_prefill: int = 1
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 8
    interval_s: float = 15.0
    tolerance: float = 0.1  # no change while the largest ratio is within 1 +- this
    shrink_latency_fraction: float = 0.5  # shrink only while p95 is under this share of its SLO
    up_stabilization_s: float = 30.0  # a need above the size must hold this long
    down_stabilization_s: float = 300.0  # shrink to the largest need over this window
    cooldown_s: float = 45.0  # after a change, before the next one
    max_down_fraction: float = 0.5  # one shrink removes at most this share of the pool (at least 1)
    max_up_factor: float = 2.0  # one growth at most multiplies the pool by this (at least +1)

    def __post_init__(self) -> None:
        positive = (
            "ttft_slo_s tpot_slo_s prefill_waiting_target prefill_running_target decode_running_target "
            "decode_kv_target interval_s up_stabilization_s down_stabilization_s"
        )
        for name in positive.split():
            if not getattr(self, name) > 0:
                raise ValueError(f"planner setting {name} must be > 0, got {getattr(self, name)}")
        for role in ROLES:
            lo, hi = self.limits(role)
            if lo < 1 or hi < lo:
                raise ValueError(
                    f"{role} pool limits must satisfy 1 <= min <= max, got min {lo}, max {hi} (the planner sizes a "
                    "pool from its own workers' load, so it cannot grow one from zero)"
                )
        if self.cooldown_s < 0 or not 0 <= self.tolerance < 1:
            raise ValueError("cooldown_s must be >= 0 and tolerance within [0, 1)")
        if self.max_up_factor <= 1:
            raise ValueError(f"max_up_factor must be > 1, got {self.max_up_factor}")
        if not 0 < self.shrink_latency_fraction <= 1 or not 0 < self.max_down_fraction <= 1:
            raise ValueError("shrink_latency_fraction and max_down_fraction must be within (0, 1]")

    def limits(self, role: str) -> tuple[int, int]:
        return (self.min_prefill, self.max_prefill) if role == "prefill" else (self.min_decode, self.max_decode)

    def ticks(self, seconds: float) -> int:
        return math.ceil(seconds / self.interval_s - 1e-9)


@dataclass(frozen=True)
class Recommendation:
    role: str
    current: int
    size: int
    reason: str

    @property
    def changed(self) -> bool:
        return self.size != self.current

    def line(self) -> str:
        move = f"{self.current} -> {self.size}" if self.changed else f"stays at {self.current}"
        return f"{self.role} {move}: {self.reason}"


@dataclass(frozen=True)
class _Ratio:
    what: str
    observed: float
    target: float
    linear: bool  # scales with load at a fixed size, so ceil(n * ratio) is the size that load needs
    versus: str = "target"
    unit: str = ""

    @property
    def value(self) -> float:
        return self.observed / self.target

    def __str__(self) -> str:
        return f"{self.what} {self.observed:.3g}{self.unit} vs {self.versus} {self.target:.3g}{self.unit}"


def need(role: str, signals: Signals | None, current: int, cfg: PolicyConfig) -> tuple[int | None, str]:
    """The size the pool needs now, undamped, and why; None when the signals cannot tell."""
    pool = signals.pools.get(role) if signals is not None else None
    if signals is None or pool is None:
        return None, f"no {role} signals from any gateway"
    if pool.workers_up == 0:
        return None, f"no healthy {role} worker reports load"
    latency, ratios = _ratios(role, pool, signals, cfg)
    top = max(ratios, key=lambda r: r.value)
    r = top.value
    lo, hi = cfg.limits(role)
    why = str(top)
    if abs(r - 1) <= cfg.tolerance:
        return current, f"{why}: within {cfg.tolerance:.0%}"
    want = math.ceil(pool.workers_up * r - 1e-9)
    if r > 1:
        # A queue or a latency is not linear in load (a backlog makes it explode), so growth on
        # such a ratio is bounded per change; a linear one is trusted whole. Workers still
        # starting are on their way: a ratio above 1 never shrinks the pool.
        linear = math.ceil(pool.workers_up * max(x.value for x in ratios if x.linear) - 1e-9)
        step = max(math.floor(current * cfg.max_up_factor), current + 1)
        size = min(max(linear, min(want, step), current), hi)
        if size < want:
            why += f" (needs {want}, {'at most' if size == hi else 'first'} {size})"
        return size, why
    if latency is not None and latency.value > cfg.shrink_latency_fraction:
        return current, f"{latency}: shrinking waits for under {cfg.shrink_latency_fraction:.0%} of the SLO"
    size = max(min(want, current), lo)
    return size, why + (f" (min {lo})" if want < lo < current else "")


def _ratios(role: str, pool: PoolSignals, signals: Signals, cfg: PolicyConfig) -> tuple[_Ratio | None, list[_Ratio]]:
    n = pool.workers_up
    if role == "prefill":
        load = [
            _Ratio("waiting/worker", pool.waiting / n, cfg.prefill_waiting_target, linear=False),
            _Ratio("running/worker", pool.running / n, cfg.prefill_running_target, linear=True),
        ]
        p95, slo, name = signals.ttft_p95, cfg.ttft_slo_s, "ttft p95"
    else:
        load = [
            _Ratio("sequences/worker", (pool.running + pool.waiting) / n, cfg.decode_running_target, linear=True),
            _Ratio("kv usage", pool.kv_usage, cfg.decode_kv_target, linear=True),
        ]
        p95, slo, name = signals.tpot_p95, cfg.tpot_slo_s, "tpot p95"
    latency = _Ratio(name, p95, slo, linear=False, versus="SLO", unit="s") if p95 is not None else None
    return latency, load + ([latency] if latency is not None else [])


class Policy:
    """The planner's decisions, tick after tick: each pool's need, damped."""

    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg
        self._dampers = {
            role: Damper(
                up_ticks=max(1, cfg.ticks(cfg.up_stabilization_s)),
                down_ticks=max(1, cfg.ticks(cfg.down_stabilization_s)),
                cooldown_ticks=cfg.ticks(cfg.cooldown_s),
                max_down_fraction=cfg.max_down_fraction,
            )
            for role in ROLES
        }

    def tick(self, signals: Signals | None, current: dict[str, int]) -> dict[str, Recommendation]:
        """One recommendation per pool in `current`; call once per interval."""
        out = {}
        for role, size in _known(current).items():
            wanted, why = need(role, signals, size, self.cfg)
            new, reason = self._dampers[role].step(size, wanted, why, *self.cfg.limits(role))
            out[role] = Recommendation(role, size, new, reason)
        return out

    def once(self, signals: Signals | None, current: dict[str, int]) -> dict[str, Recommendation]:
        """Undamped: what one look at the signals says (damping needs a history)."""
        out = {}
        for role, size in _known(current).items():
            lo, hi = self.cfg.limits(role)
            wanted, why = need(role, signals, size, self.cfg)
            new = min(max(size if wanted is None else wanted, lo), hi)
            out[role] = Recommendation(role, size, new, why)
        return out


def _known(current: dict[str, int]) -> dict[str, int]:
    return {role: current[role] for role in ROLES if role in current}
