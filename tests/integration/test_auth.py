"""API keys through real gateways: 401 without a key and with a revoked one; a key over its budget
gets 429 through two gateway replicas sharing Redis while another key is unaffected; a key sees
only its models; a guessed-prefix probe from another key sees no cached tokens."""

from __future__ import annotations

import uuid

import httpx

from gateway.api_keys import KeyStore
from kvrelay.launcher import Cluster, free_port
from tests.waiting import wait_for


def _chat(url: str, key: str | None, content: str = "hi", model: str | None = None) -> httpx.Response:
    body = {"model": model or "tiny-llama", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_keys_limits_and_isolation_across_two_gateways(tiny_cluster, tiny_dir, redis_url, tmp_path):
    store = KeyStore(str(tmp_path / "unused.json"), redis_url)
    limited, _ = store.add("limited", rpm=3)
    other, _ = store.add("other", models=["no-such-model"])
    tenant_a, _ = store.add("tenant-a")
    tenant_b, _ = store.add("tenant-b")
    env = {"KVRELAY_AUTH__ENABLED": "true", "KVRELAY_AUTH__RELOAD_S": "0.5", "KVRELAY_ROUTING_HEADERS": "true"}
    cluster = Cluster(log_dir=str(tmp_path), env=env)
    urls = []
    try:
        for _ in range(2):  # two replicas: static workers, shared state (keys, budgets) in Redis
            port = free_port()
            args = ["gateway", "--host", "127.0.0.1", "--port", str(port), "--model", tiny_dir, "--log-level", "info"]
            args += ["--prefill", tiny_cluster.prefill[0], "--decode", tiny_cluster.decode[0], "--registry", redis_url]
            cluster.spawn(f"gateway-{port}", args)
            urls.append(f"http://127.0.0.1:{port}")

        def ready(url: str) -> bool:
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        for url in urls:
            wait_for(lambda u=url: ready(u), 60, f"{url} ready")
        a, b = urls
        model = httpx.get(f"{a}/v1/models", headers={"Authorization": f"Bearer {tenant_a}"}).json()["data"][0]["id"]

        # no key, a wrong key: 401 before anything else happens
        assert _chat(a, None, model=model).status_code == 401
        assert _chat(a, "kvr-" + "x" * 43, model=model).status_code == 401
        assert httpx.get(f"{a}/v1/models").status_code == 401

        # one budget across both replicas; the other key is unaffected
        codes = [_chat(u, limited, model=model).status_code for u in (a, b, a, b)]
        assert codes == [200, 200, 200, 429], codes
        over = _chat(a, limited, model=model)
        assert (
            over.status_code == 429
            and over.headers["retry-after"]
            and over.headers["x-ratelimit-limit-requests"] == "3"
        )
        assert _chat(b, tenant_a, model=model).status_code == 200

        # a key sees only its models (no hint that the model exists)
        denied = _chat(a, other, model=model)
        assert denied.status_code == 404 and denied.json()["error"]["code"] == "model_not_found"
        listed = httpx.get(f"{a}/v1/models", headers={"Authorization": f"Bearer {other}"}).json()["data"]
        assert listed == []

        # tenants: a's cached system prompt gives b no cached tokens and no prediction
        secret = f"the vault code is {uuid.uuid4().hex} " * 4

        def cached(url: str, key: str) -> tuple[int, int]:
            body = {
                "model": model,
                "messages": [{"role": "system", "content": secret}, {"role": "user", "content": "hi"}],
                "max_tokens": 2,
            }
            r = httpx.post(
                f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
            )
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], int(
                r.headers["x-kvrelay-predicted-cached-tokens"]
            )

        assert cached(a, tenant_a)[0] == 0
        assert cached(b, tenant_b) == (0, 0)
        assert cached(a, tenant_a)[0] > 0

        # a revoked key stops working within the reload interval, on every replica
        store.revoke("tenant-a")
        wait_for(lambda: all(_chat(u, tenant_a, model=model).status_code == 401 for u in urls), 10, "revocation")
    finally:
        cluster.stop()
