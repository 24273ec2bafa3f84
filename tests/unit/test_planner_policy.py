"""The policy one rule at a time: each pool's need from its signals, then the damping."""

from __future__ import annotations

import pytest

from gateway.planner.damping import Damper
from gateway.planner.policy import Policy, PolicyConfig, need
from gateway.planner.signals import PoolSignals, Signals

CFG = PolicyConfig()


def signals(
    prefill: PoolSignals | None = None,
    decode: PoolSignals | None = None,
    ttft: float | None = None,
    tpot: float | None = None,
) -> Signals:
    pools = {role: p for role, p in (("prefill", prefill), ("decode", decode)) if p is not None}
    return Signals(pools, ttft, tpot, requests=0 if ttft is None else 100)


@pytest.mark.parametrize(
    ("role", "sig", "current", "size", "why"),
    [
        # prefill: 4 workers, target 0.75 prompts running and 2 queued per worker, TTFT SLO 2 s
        ("prefill", signals(PoolSignals(4, 3.0, 4, 0), ttft=1.0), 4, 4, "within 10%"),
        ("prefill", signals(PoolSignals(4, 3.0, 4, 0), ttft=3.0), 4, 6, "ttft p95"),
        ("prefill", signals(PoolSignals(4, 3.0, 16, 0), ttft=1.0), 4, 8, "waiting/worker 4"),
        ("prefill", signals(PoolSignals(4, 3.0, 400, 0), ttft=1.0), 4, 8, "needs 200, at most 8"),
        ("prefill", signals(PoolSignals(2, 2.0, 400, 0), ttft=1.0), 2, 4, "needs 200, first 4"),
        ("prefill", signals(PoolSignals(4, 1.0, 0, 0), ttft=0.5), 4, 2, "running/worker 0.25"),
        ("prefill", signals(PoolSignals(4, 1.0, 0, 0), ttft=1.5), 4, 4, "shrinking waits for under 50% of the SLO"),
        ("prefill", signals(PoolSignals(4, 0, 0, 0)), 4, 1, "(min 1)"),  # no traffic at all
        # decode: target 32 sequences per worker, 70% KV, TPOT SLO 0.1 s
        ("decode", signals(decode=PoolSignals(2, 64, 0, 0.5), tpot=0.04), 2, 2, "within 10%"),
        ("decode", signals(decode=PoolSignals(2, 64, 128, 0.99), tpot=0.09), 2, 6, "sequences/worker 96"),
        ("decode", signals(decode=PoolSignals(2, 40, 0, 0.95), tpot=0.05), 2, 3, "kv usage 0.95"),
        ("decode", signals(decode=PoolSignals(2, 40, 0, 0.5), tpot=0.15), 2, 3, "tpot p95"),
        ("decode", signals(decode=PoolSignals(6, 30, 0, 0.1)), 6, 1, "sequences/worker 5"),
        # a latency under its SLO still bounds a shrink: ceil(6 * 0.03 / 0.1)
        ("decode", signals(decode=PoolSignals(6, 30, 0, 0.1), tpot=0.03), 6, 2, "tpot p95"),
        # two of four workers still starting: the pool is not shrunk under them, nor grown twice
        ("decode", signals(decode=PoolSignals(2, 70, 0, 0.6), tpot=0.05), 4, 4, "sequences/worker 35"),
        # nothing to go by: hold (None), never read as 'no traffic'
        ("decode", None, 3, None, "no decode signals"),
        ("decode", signals(prefill=PoolSignals(1, 0, 0, 0)), 3, None, "no decode signals"),
        ("prefill", signals(PoolSignals(0, 0, 0, 0), ttft=9.0), 2, None, "no healthy prefill worker"),
    ],
)
def test_need(role, sig, current, size, why):
    got, reason = need(role, sig, current, CFG)
    assert got == size and why in reason, reason


def test_need_never_exceeds_max_nor_goes_under_min():
    cfg = PolicyConfig(min_decode=2, max_decode=5)
    assert need("decode", signals(decode=PoolSignals(4, 4000, 0, 1.0), tpot=9.0), 4, cfg)[0] == 5
    assert need("decode", signals(decode=PoolSignals(4, 0, 0, 0.0)), 4, cfg)[0] == 2


def damper(up: int = 2, down: int = 5, cooldown: int = 2, fraction: float = 0.5) -> Damper:
    return Damper(up_ticks=up, down_ticks=down, cooldown_ticks=cooldown, max_down_fraction=fraction)


def run(d: Damper, current: int, needs: list[int | None], lo: int = 1, hi: int = 16) -> list[int]:
    """Feed needs tick by tick, applying each decision; the sizes after each tick."""
    sizes = []
    for n in needs:
        current, _ = d.step(current, n, "test", lo, hi)
        sizes.append(current)
    return sizes


def test_growth_waits_for_confirmation_and_takes_the_smaller_need():
    assert run(damper(up=2), 2, [6, 2, 6, 4]) == [2, 2, 2, 4]
    assert run(damper(up=1), 2, [6]) == [6]


def test_cooldown_after_a_change():
    assert run(damper(up=1, cooldown=3), 2, [4, 8, 8, 8]) == [4, 4, 4, 8]


def test_shrink_takes_the_largest_need_of_the_window_and_a_bounded_step():
    sizes = run(damper(down=5, cooldown=0, fraction=0.5), 8, [1, 1, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    # ticks 1-4: the window is not full yet; then down only to its largest need (7) until that
    # leaves it (tick 8), then halving at most: 7 -> 4 -> 2 -> 1
    assert sizes == [8, 8, 8, 8, 7, 7, 7, 4, 2, 1, 1, 1]


def test_missing_signals_hold_and_break_a_growth_streak():
    assert run(damper(up=2), 2, [6, None, 6, 6]) == [2, 2, 2, 6]


def test_limits_apply_at_once():
    d = damper(cooldown=10)
    size, reason = d.step(12, 12, "test", 1, 8)
    assert size == 8 and "1..8" in reason
    assert d.step(0, None, "test", 1, 8)[0] == 1


def test_config_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="min 0"):
        PolicyConfig(min_prefill=0)
    with pytest.raises(ValueError, match="min 5, max 3"):
        PolicyConfig(min_decode=5, max_decode=3)
    with pytest.raises(ValueError, match="ttft_slo_s must be > 0"):
        PolicyConfig(ttft_slo_s=0)


def test_windows_are_in_seconds_and_become_ticks():
    policy = Policy(PolicyConfig(interval_s=10, up_stabilization_s=20, down_stabilization_s=60, cooldown_s=0))
    busy = signals(decode=PoolSignals(1, 64, 0, 0.5), tpot=0.05)
    idle = signals(decode=PoolSignals(2, 0, 0, 0.0))
    sizes = []
    current = {"decode": 1}
    for sig in [busy, busy] + [idle] * 7:
        rec = policy.tick(sig, current)["decode"]
        current = {"decode": rec.size}
        sizes.append(rec.size)
    assert sizes == [1, 2, 2, 2, 2, 2, 2, 1, 1]  # up after 2 ticks; down once 6 ticks of needs are all lower


def test_once_is_undamped_and_bounded():
    recs = Policy(CFG).once(signals(PoolSignals(2, 3.0, 0, 0), PoolSignals(1, 0, 0, 0), ttft=1.0), {"prefill": 2})
    assert set(recs) == {"prefill"}
    assert recs["prefill"].size == 4 and recs["prefill"].line().startswith("prefill 2 -> 4: running/worker 1.5")
