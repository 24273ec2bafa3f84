"""A canary that breaks is rolled back by the gateway's judge on its own: only requests the route
sent to the canary fail, and after the rollback every request goes to the stable model."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import yaml

from gateway.routes.spec import JudgeSpec, RouteSpec, Shadow, Variant
from gateway.routes.store import MemoryRouteStore
from kvrelay.launcher import Cluster, free_port, free_worker_ports
from tests.integration.client import metric
from tests.integration.conftest import check_no_kv_held
from tests.integration.test_models import QUESTION, reference, two_models  # noqa: F401 - two_models: the fixture
from tests.waiting import wait_for


def _ask(url: str, user: str) -> httpx.Response:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "user": user}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def _start(tmp_path, model_dirs: list[str], spec: RouteSpec) -> tuple[Cluster, MemoryRouteStore, str, list[str]]:
    """Two decode workers (tiny-a, tiny-b) behind a gateway whose routes file holds `spec`."""
    routes = tmp_path / "routes.json"
    store = MemoryRouteStore(path=routes)
    store.set(spec)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"routes_file": str(routes), "routes_interval_s": 0.2}))
    cluster = Cluster(log_dir=str(tmp_path), env={"KVRELAY_ROUTING_HEADERS": "true"})
    try:
        ports = free_worker_ports(2)
        workers = [cluster.worker("decode", port, 1, m) for port, m in zip(ports, model_dirs, strict=True)]
        extra = ["--models", ",".join(model_dirs), "--config", str(config)]
        url = cluster.gateway(free_port(), [], workers, None, extra)
        cluster.wait_ready(url, want_mode="colocated")
        wait_for(lambda: not httpx.get(f"{url}/ready").json()["workers"]["decode"]["down"], 60, "both workers up")
    except BaseException:
        cluster.stop()
        raise
    return cluster, store, url, workers


def test_a_failing_canary_is_rolled_back_automatically(tmp_path, two_models):  # noqa: F811
    spec = RouteSpec(
        name="chat",
        variants=[Variant(name="stable", model="tiny-a", weight=70), Variant(name="canary", model="tiny-b", weight=30)],
        # Latency rules off: a tiny model's TPOT is a few ms, within this machine's noise. Errors decide.
        judge=JudgeSpec(min_requests=5, max_ttft_p95_ratio=1000, max_tpot_p95_ratio=1000),
    )
    cluster, store, url, (stable, _) = _start(tmp_path, two_models, spec)
    try:
        assert "chat" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]

        healthy = [_ask(url, f"user-{i}") for i in range(30)]
        assert all(r.status_code == 200 for r in healthy), [r.text for r in healthy if r.status_code != 200]
        served = {
            v: metric(url, "kvrelay_gateway_route_requests_total", route="chat", variant=v)
            for v in ("stable", "canary")
        }
        assert served["stable"] > 0 and served["canary"] > 0 and served["stable"] + served["canary"] == 30

        os.kill(cluster.procs[1][1].pid, signal.SIGKILL)  # the canary's worker dies
        failed = 0
        sent = 0
        deadline = time.monotonic() + 60
        while store.get("chat").rolled_back is None:
            assert time.monotonic() < deadline, "the canary was not rolled back within 60 s"
            r = _ask(url, f"late-user-{sent}")
            sent += 1
            failed += r.status_code != 200
        record = store.get("chat").rolled_back
        assert record.variant == "canary" and "error rate" in record.reason
        assert 0 < failed < sent  # only the canary's share failed: the stable's requests went on
        wait_for(  # the gateway that wrote the rollback serves it from then on
            lambda: metric(url, "kvrelay_gateway_route_weight", route="chat", variant="canary") == 0,
            10,
            "the gateway to serve the rolled-back route",
        )
        after = [_ask(url, f"user-{i}") for i in range(30)]  # the same users as before, canary ones included
        assert all(r.status_code == 200 for r in after)
        assert metric(url, "kvrelay_gateway_route_rollbacks_total", route="chat", variant="canary") == 1
        shown = json.loads((tmp_path / "routes.json").read_text())
        assert "rolled_back" in json.dumps(shown)
        assert "rolled back variant canary" in next(tmp_path.glob("gateway-*.log")).read_text()
        check_no_kv_held([stable])
    finally:
        cluster.stop()


def test_shadow_copies_run_on_the_shadow_model_and_are_never_returned(tmp_path, two_models):  # noqa: F811
    spec = RouteSpec(
        name="chat",
        variants=[Variant(name="stable", model="tiny-a", weight=100)],
        shadow=Shadow(model="tiny-b", percent=100),
    )
    cluster, _, url, (stable, shadow) = _start(tmp_path, two_models, spec)
    try:
        want = reference(two_models[0], 4)
        for i in range(5):
            r = _ask(url, f"user-{i}")
            assert r.status_code == 200 and r.headers["x-kvrelay-decode"] == f"decode-{stable.rsplit(':', 1)[1]}"
        wait_for(
            lambda: metric(url, "kvrelay_gateway_route_shadow_requests_total", route="chat", outcome="ok") == 5,
            30,
            "the five shadow copies to finish",
        )
        host, port = shadow.rsplit(":", 1)
        assert metric(f"http://{host}:{int(port) + 1000}", "kvrelay_worker_requests_total", rpc="Generate") == 5
        body = {"model": "chat", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "temperature": 0}
        ids = httpx.post(f"{url}/v1/chat/completions", json={**body, "return_token_ids": True}, timeout=60)
        assert ids.json()["choices"][0]["token_ids"] == want  # the stable model's answer, not the shadow's
        check_no_kv_held([stable, shadow])
    finally:
        cluster.stop()
