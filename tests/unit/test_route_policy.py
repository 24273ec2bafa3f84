"""Model routes, the policy half: spec validation, sticky assignment, the window and the SLO judge."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from gateway.routes.assign import choose, shadowed
from gateway.routes.judge import Judge
from gateway.routes.spec import JudgeSpec, RouteSpec, Shadow, Variant, explain, parse_shadow, parse_variants
from gateway.routes.store import MemoryRouteStore
from gateway.routes.window import Outcome, Window
from tests.route_helpers import FakeClock, feed, route, windows_for


# -- spec -------------------------------------------------------------------------------------------
def test_compact_variants_parse_and_the_baseline_defaults_to_the_first():
    variants = parse_variants("stable=modelA:90, canary=org/model:b:10")
    assert [(v.name, v.model, v.weight) for v in variants] == [("stable", "modelA", 90), ("canary", "org/model:b", 10)]
    assert RouteSpec(name="r", variants=variants).baseline == "stable"
    assert parse_shadow("modelC:2.5") == Shadow(model="modelC", percent=2.5)


@pytest.mark.parametrize(
    ("variants", "baseline", "needle"),
    [
        ([], "", "variants"),
        ([Variant(name="a", model="m", weight=1), Variant(name="a", model="n", weight=1)], "", "unique; repeated: a"),
        ([Variant(name="a", model="m", weight=0)], "", "add up to more than 0"),
        ([Variant(name="a", model="m", weight=1)], "b", "baseline 'b' is not one of the variants (a)"),
    ],
)
def test_invalid_routes_say_what_is_wrong(variants, baseline, needle):
    with pytest.raises(ValidationError) as e:
        RouteSpec(name="r", variants=variants, baseline=baseline)
    assert needle in explain(e.value)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: Variant(name="a", model="m", weight=-1), "greater than or equal to 0"),
        (lambda: Shadow(model="m", percent=101), "less than or equal to 100"),
        (lambda: JudgeSpec(promote_steps=[10, 10, 50]), "strictly increase"),
        (lambda: JudgeSpec(promote_steps=[50, 150]), "1..100"),
    ],
)
def test_invalid_parts_are_refused(make, needle):
    with pytest.raises(ValidationError) as e:
        make()
    assert needle in explain(e.value)


@pytest.mark.parametrize("text", ["stable=modelA", "modelA:90", "stable=modelA:ninety", "a=m:1,", "=m:1"])
def test_malformed_compact_variants_are_refused(text):
    with pytest.raises(ValueError, match="NAME=MODEL:WEIGHT"):
        parse_variants(text)


# -- assignment -------------------------------------------------------------------------------------
def test_a_user_always_gets_the_same_variant():
    spec, rng = route(50), random.Random(1)
    for user in ("alice", "bob", "carol"):
        seen = {choose(spec, user, rng).name for _ in range(1000)}
        assert len(seen) == 1, (user, seen)


def test_raising_the_canary_keeps_everyone_already_on_it():
    rng = random.Random(0)
    users = [f"user-{i}" for i in range(10_000)]
    before = {u for u in users if choose(route(10), u, rng).name == "canary"}
    after = {u for u in users if choose(route(25), u, rng).name == "canary"}
    assert before <= after
    assert 0.08 < len(before) / len(users) < 0.12 and 0.23 < len(after) / len(users) < 0.27


def test_shares_follow_the_weights_over_many_users():
    spec = RouteSpec(
        name="ab",
        variants=[Variant(name="a", model="m1", weight=60), Variant(name="b", model="m2", weight=30)]
        + [Variant(name="c", model="m3", weight=10)],
    )
    counts = Counter(choose(spec, f"u{i}", random.Random(0)).name for i in range(10_000))
    assert abs(counts["a"] / 10_000 - 0.6) < 0.02
    assert abs(counts["b"] / 10_000 - 0.3) < 0.02
    assert abs(counts["c"] / 10_000 - 0.1) < 0.015


def test_without_a_user_key_or_stickiness_the_pick_is_random_by_weight():
    rng = random.Random(7)
    counts = Counter(choose(route(25), None, rng).name for _ in range(10_000))
    assert abs(counts["canary"] / 10_000 - 0.25) < 0.02
    loose = route(50).model_copy(update={"sticky": False})
    assert len({choose(loose, "alice", rng).name for _ in range(100)}) == 2


def test_shadowing_is_decided_by_the_request_id():
    spec = route().model_copy(update={"shadow": Shadow(model="model-c", percent=20)})
    picks = [shadowed(spec, f"req-{i}") for i in range(10_000)]
    assert abs(sum(picks) / 10_000 - 0.2) < 0.02
    assert picks == [shadowed(spec, f"req-{i}") for i in range(10_000)]
    assert not any(shadowed(route(), f"req-{i}") for i in range(100))


# -- window -----------------------------------------------------------------------------------------
def test_the_window_forgets_old_samples_and_stays_bounded():
    w = Window(window_s=10, max_samples=50)
    feed(w, at=0, n=5, errors=5, ttft=9.0)
    for i in range(100):
        w.add(Outcome(20 + i * 0.01, ok=True, ttft_s=float(i), tpot_s=None))
    assert len(w) == 50
    s = w.stats(now=21)
    assert (s.requests, s.errors, s.tpot_p95) == (50, 0, None)
    assert s.ttft_p95 == 97.0  # nearest rank over the 50 kept: 50..99


# -- judge ------------------------------------------------------------------------------------------
def test_the_judge_rolls_back_on_error_rate():
    spec = route(10)
    w = windows_for(spec)
    feed(w["stable"], 990, 200, errors=2)
    feed(w["canary"], 990, 30, errors=6)
    v = Judge().evaluate(spec, w, now=1_000)
    assert (v.action, v.variant) == ("rollback", "canary")
    assert "error rate 0.200 > baseline 0.010 + 0.05" in v.reason
    assert [(x.name, x.weight) for x in v.spec.variants] == [("stable", 100), ("canary", 0)]
    assert v.spec.rolled_back.variant == "canary" and v.spec.rolled_back.evidence["canary_error_rate"] == 0.2


def test_a_faultless_baseline_lets_the_canary_error_rate_decide_alone():
    spec = route(50)
    w = windows_for(spec)
    feed(w["stable"], 990, 5)  # below min_requests, but no errors
    feed(w["canary"], 990, 40, errors=10)
    assert Judge().evaluate(spec, w, now=1_000).action == "rollback"
    feed(w["stable"], 990, 1, errors=1)  # one error in too few requests: the comparison is not trusted
    assert Judge().evaluate(spec, w, now=1_000).action == "none"


def test_the_judge_rolls_back_on_ttft_p95():
    spec = route(10)
    w = windows_for(spec)
    feed(w["stable"], 990, 100, ttft=0.2)
    feed(w["canary"], 990, 25, ttft=0.29)
    assert Judge().evaluate(spec, w, now=1_000).action == "none"  # 1.45x: within 1.5x
    feed(w["canary"], 995, 25, ttft=0.5)
    v = Judge().evaluate(spec, w, now=1_000)
    assert v.action == "rollback" and v.reason.startswith("TTFT p95 0.500 s > 1.5 x baseline 0.200 s")


def test_the_judge_rolls_back_on_tpot_p95():
    spec = route(10)
    w = windows_for(spec)
    feed(w["stable"], 990, 100, tpot=0.02)
    feed(w["canary"], 990, 30, tpot=0.05)
    assert Judge().evaluate(spec, w, now=1_000).reason.startswith("TPOT p95")


def test_the_judge_waits_for_min_requests_and_forgets_outside_the_window():
    spec = route(10, min_requests=20, window_s=60)
    w = windows_for(spec)
    feed(w["stable"], 990, 100)
    feed(w["canary"], 990, 19, errors=19)
    assert Judge().evaluate(spec, w, now=1_000).action == "none"
    feed(w["canary"], 990, 1, errors=1)
    assert Judge().evaluate(spec, w, now=1_000).action == "rollback"
    assert Judge().evaluate(spec, w, now=1_051).action == "none"  # those failures are older than 60 s


def test_a_rolled_back_route_is_left_alone_until_an_operator_sets_it_again():
    clock = FakeClock()
    store = MemoryRouteStore(clock=clock)
    spec = store.set(route(10, promote_steps=[50, 100], promote_after_s=0))
    w = windows_for(spec)
    feed(w["stable"], clock.now, 100)
    feed(w["canary"], clock.now, 30, errors=30)
    verdict = Judge().evaluate(spec, w, clock.now)
    assert store.apply(verdict.spec, spec.revision)
    rolled = store.get("chat")
    clock.now += 1_000
    w = windows_for(rolled)
    feed(w["stable"], clock.now, 100)
    feed(w["canary"], clock.now, 100)  # healthy now: still no promotion, no new verdict
    assert Judge().evaluate(rolled, w, clock.now).action == "none"
    again = store.set(route(10, promote_steps=[50, 100], promote_after_s=0))
    assert again.rolled_back is None and again.revision == rolled.revision + 1
    assert Judge().evaluate(again, w, clock.now).action == "promote"


def test_promotion_waits_for_healthy_time_since_the_last_change():
    clock = FakeClock()
    spec = MemoryRouteStore(clock=clock).set(route(10, promote_steps=[25], promote_after_s=120, min_requests=20))
    w = windows_for(spec)
    clock.now += 119
    feed(w["stable"], clock.now, 100)
    feed(w["canary"], clock.now, 30)
    assert Judge().evaluate(spec, w, clock.now).action == "none"
    clock.now += 1
    assert Judge().evaluate(spec, w, clock.now).action == "promote"
