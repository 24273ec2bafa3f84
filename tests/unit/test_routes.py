"""Model routes: spec validation, sticky assignment, the SLO judge, the stores, the router and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from pydantic import ValidationError
from typer.testing import CliRunner

from gateway.routes.assign import choose, shadowed
from gateway.routes.judge import Judge
from gateway.routes.router import Assignment, Router
from gateway.routes.spec import JudgeSpec, RouteSpec, Shadow, Variant, explain, parse_shadow, parse_variants
from gateway.routes.store import MemoryRouteStore, RedisRouteStore
from gateway.routes.window import Outcome, Window
from kvrelay.redis_server import redis_server
from kvrelay.route_command import route_app


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


# -- router -----------------------------------------------------------------------------------------
def drive(router: Router, clock: FakeClock, seconds: int, canary_errors: bool = False) -> None:
    """One second at a time: 5 requests to each live variant, then a judge tick."""
    for _ in range(seconds):
        clock.now += 1
        spec = router.get("chat")
        for v in spec.variants:
            if v.weight:
                for _ in range(5):
                    ok = not (canary_errors and v.name == "canary")
                    router.record(Assignment("chat", v.name, v.model), ok, 0.1, 0.02)
        asyncio.run(router.tick())


def test_the_router_promotes_through_the_steps_until_the_canary_is_the_baseline():
    clock = FakeClock()
    store = MemoryRouteStore(clock=clock)
    store.set(route(10, promote_steps=[25, 50, 100], promote_after_s=30, min_requests=20, window_s=20))
    router = Router(store, clock=clock)
    asyncio.run(router.tick())
    promotions = metric("kvrelay_gateway_route_promotions_total", route="chat", variant="canary")
    shares = []
    for _ in range(4):
        drive(router, clock, 31)
        spec = store.get("chat")
        shares.append((spec.baseline, [v.weight for v in spec.variants]))
    assert shares == [
        ("stable", [75, 25]),
        ("stable", [50, 50]),
        ("canary", [0, 100]),
        ("canary", [0, 100]),  # the last step: nothing more to do
    ]
    assert metric("kvrelay_gateway_route_promotions_total", route="chat", variant="canary") == promotions + 3
    assert metric("kvrelay_gateway_route_weight", route="chat", variant="canary") == 100


class StaleReads:
    """A replica that judged the route as it was before another replica's write."""

    def __init__(self, store: MemoryRouteStore) -> None:
        self.store, self.snapshot = store, store.all()

    def all(self) -> dict[str, RouteSpec]:
        return self.snapshot

    def apply(self, spec: RouteSpec, expected_revision: int) -> bool:
        return self.store.apply(spec, expected_revision)


def test_a_rollback_is_written_once_logged_and_traced(caplog):
    clock = FakeClock()
    store = MemoryRouteStore(clock=clock)
    store.set(route(50, min_requests=20))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    replicas = [Router(store, clock=clock, tracer=tracer), Router(StaleReads(store), clock=clock, tracer=tracer)]
    for r in replicas:
        asyncio.run(r.tick())
        for _ in range(30):
            r.record(Assignment("chat", "stable", "model-a"), True, 0.1, 0.02)
            r.record(Assignment("chat", "canary", "model-b"), False, None, None)
    before = metric("kvrelay_gateway_route_rollbacks_total", route="chat", variant="canary")
    with caplog.at_level(logging.INFO, logger="gateway.routes.router"):
        landed = [asyncio.run(r.tick()) for r in replicas]
    assert [[v.action for v in x] for x in landed] == [["rollback"], []]  # both judged revision 1; one write landed
    assert metric("kvrelay_gateway_route_rollbacks_total", route="chat", variant="canary") == before + 1
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("route chat: rolled back variant canary: error rate 1.000 > baseline 0.000")
    assert "route chat changed before the judge's rollback landed; judging it anew" in caplog.messages
    [span] = exporter.get_finished_spans()  # the judge's decision is a trace of its own
    assert span.name == "route_rollback"
    [event] = span.events
    assert event.name == "kvrelay.route.rollback" and event.attributes["kvrelay.route.variant"] == "canary"
    stored = store.get("chat")
    assert stored.revision == 2 and stored.rolled_back.variant == "canary"
    assert replicas[0].get("chat") == stored
    assert {replicas[0].resolve("chat", f"u{i}", "req").variant for i in range(200)} == {"stable"}


def test_resolve_is_none_for_names_that_are_not_routes():
    store = MemoryRouteStore([route().model_copy(update={"shadow": Shadow(model="model-c", percent=100)})])
    router = Router(store)
    assert router.resolve("chat", "alice", "req-1") is None  # nothing read from the store yet
    asyncio.run(router.tick())
    assert router.resolve("model-a", "alice", "req-1") is None
    a = router.resolve("chat", "alice", "req-1")
    assert (a.route, a.shadow_model) == ("chat", "model-c")
    assert a.model == {"stable": "model-a", "canary": "model-b"}[a.variant]
    assert router.public_names() == ["chat"]


# -- stores -----------------------------------------------------------------------------------------
def test_memory_store_roundtrip_and_compare_and_set():
    clock = FakeClock(5.0)
    store = MemoryRouteStore(clock=clock)
    first = store.set(route(10))
    assert (first.revision, first.changed_at) == (1, 5.0)
    assert store.get("chat") == first and list(store.all()) == ["chat"]
    second = store.set(route(20))
    assert second.revision == 2
    assert not store.apply(route(0), expected_revision=1)  # judged an older revision: loses
    assert store.get("chat") == second
    assert store.apply(route(30), expected_revision=2) and store.get("chat").revision == 3
    assert store.remove("chat") and not store.remove("chat") and store.get("chat") is None


def test_a_routes_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(
        "routes:\n  - name: chat\n    variants:\n      - {name: stable, model: m1, weight: 9}\n"
        "      - {name: canary, model: m2, weight: 1}\n"
    )
    store = MemoryRouteStore.from_file(path)
    assert store.get("chat").baseline == "stable"
    other = MemoryRouteStore.from_file(path)
    other.set(route(40))
    assert store.get("chat").variant("canary").weight == 40
    path.write_text("routes: [{name: chat}]")
    with pytest.raises(ValueError, match="route #0 in"):
        store.all()


@pytest.fixture
def redis_client(tmp_path) -> Iterator[redis.Redis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with redis_server(str(tmp_path)) as url:
        client = redis.Redis.from_url(url)
        yield client
        client.close()


SECRET = b"a-shared-secret-of-enough-bytes"


def test_redis_store_roundtrip_and_compare_and_set(redis_client):
    clock = FakeClock()
    store = RedisRouteStore(redis_client, "t", SECRET, clock=clock)
    replica = RedisRouteStore(redis_client, "t", SECRET)
    judged = store.set(route(10))
    assert judged.revision == 1 and replica.get("chat") == judged
    rollback = route(0)
    newer = store.set(route(25))  # an operator's set lands after the judge read revision 1
    assert not replica.apply(rollback, expected_revision=judged.revision)
    assert replica.get("chat") == newer
    assert store.apply(rollback, expected_revision=newer.revision)
    assert not replica.apply(rollback, expected_revision=newer.revision)  # the same rollback, twice
    assert replica.all()["chat"].revision == 3
    assert redis_client.hkeys("t:routes") == [b"chat"]
    assert store.remove("chat") and replica.all() == {}


def test_redis_compare_and_set_holds_when_an_operator_writes_in_between(redis_client):
    operator = RedisRouteStore(redis_client, "t", SECRET)
    judge_side = RedisRouteStore(redis_client, "t", SECRET)
    judged = operator.set(route(10))
    decode = judge_side._decode

    def operator_writes_after_the_read(name: str, raw: bytes) -> RouteSpec | None:
        judge_side._decode = decode
        operator.set(route(25))  # between the judge's read of revision 1 and its write
        return decode(name, raw)

    judge_side._decode = operator_writes_after_the_read
    assert not judge_side.apply(route(0), expected_revision=judged.revision)
    stored = operator.get("chat")
    assert stored.revision == 2 and stored.variant("canary").weight == 25


def test_redis_records_that_do_not_verify_are_ignored(redis_client, caplog):
    store = RedisRouteStore(redis_client, "t", SECRET)
    store.set(route(10))
    store.set(route(10).model_copy(update={"name": "other"}))
    record = json.loads(redis_client.hget("t:routes", "chat"))
    record["route"]["variants"][1]["weight"] = 100  # tampered: all traffic to the canary
    redis_client.hset("t:routes", "chat", json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="gateway.routes.store"):
        assert store.get("chat") is None and list(store.all()) == ["other"]
        store.all()
    assert [r.getMessage() for r in caplog.records].count(
        "ignoring route record 'chat' in Redis (t:routes): not signed with the shared secret"
    ) == 1
    assert not store.apply(route(0), expected_revision=1)
    assert RedisRouteStore(redis_client, "t", None).get("chat").variant("canary").weight == 100  # no secret: no check
    RedisRouteStore(redis_client, "t", None).set(route(10))  # unsigned
    assert store.get("chat") is None


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_set_show_and_rm_with_a_routes_file(tmp_path):
    runner, path = CliRunner(), str(tmp_path / "routes.json")
    args = ["--file", path]
    r = runner.invoke(
        route_app,
        ["set", "chat", "--variants", "stable=modelA:90,canary=modelB:10", "--shadow", "modelC:5"]
        + ["--promote-steps", "10,25,50,100", "--min-requests", "30", *args],
    )
    assert r.exit_code == 0, r.output
    assert "revision 1: stable=modelA:90, canary=modelB:10" in r.output
    shown = json.loads(runner.invoke(route_app, ["show", "chat", "--json", *args]).output)
    assert shown["judge"]["min_requests"] == 30 and shown["judge"]["promote_steps"] == [10, 25, 50, 100]
    assert shown["shadow"] == {"model": "modelC", "percent": 5.0}

    store = MemoryRouteStore.from_file(path)
    spec = store.get("chat")
    w = windows_for(spec)
    feed(w["stable"], spec.changed_at, 100)
    feed(w["canary"], spec.changed_at, 40, errors=40)
    verdict = Judge().evaluate(spec, w, spec.changed_at)
    assert store.apply(verdict.spec, spec.revision)
    text = runner.invoke(route_app, ["show", *args]).output
    assert "revision 2" in text and "modelB" in text
    assert "ROLLED BACK canary" in text and "error rate 1.000 > baseline 0.000" in text

    bad = runner.invoke(route_app, ["set", "chat", "--variants", "a=m:1,a=n:1", *args])
    assert bad.exit_code == 2 and "variant names must be unique" in bad.output
    assert runner.invoke(route_app, ["rm", "chat", *args]).exit_code == 0
    gone = runner.invoke(route_app, ["show", "chat", *args])
    assert gone.exit_code == 2 and "no route named 'chat'" in gone.output


def test_cli_needs_a_store():
    r = CliRunner().invoke(route_app, ["show"], env={"KVRELAY_REGISTRY": "", "KVRELAY_ROUTES_FILE": ""})
    assert r.exit_code == 2 and "--registry" in r.output


def test_a_canary_set_again_is_judged_only_on_what_happened_since():
    spec = route(10).model_copy(update={"changed_at": 995.0})  # the operator re-enabled it at 995
    w = windows_for(spec)
    feed(w["stable"], 990, 200)
    feed(w["canary"], 990, 30, errors=30)  # its failures before the fix, still inside the window
    assert Judge().evaluate(spec, w, now=1_000).action == "none"
    feed(w["canary"], 998, 30, errors=10)  # and after it: judged on these alone
    v = Judge().evaluate(spec, w, now=1_000)
    assert v.action == "rollback" and "over 30 requests" in v.reason
