"""Model routes, the serving half: the router, the stores (memory, file, Redis) and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Iterator

import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

from gateway.routes.judge import Judge
from gateway.routes.router import Assignment, Router
from gateway.routes.spec import RouteSpec, Shadow
from gateway.routes.store import MemoryRouteStore, RedisRouteStore
from kvrelay.redis_server import redis_server
from kvrelay.route_command import route_app
from tests.route_helpers import FakeClock, feed, metric, route, windows_for


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
