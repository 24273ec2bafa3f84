"""API keys and per-key rate limits, without a gateway process: keys are stored as salted digests
only, checked in constant time, revoked for good; budgets are token buckets, shared through Redis
by every replica, with OpenAI's x-ratelimit headers; the CLI shows a key exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from typer.testing import CliRunner

from gateway.access import AuthMiddleware
from gateway.api_keys import KeyStore
from gateway.rate_limits import MemoryBuckets, RedisBuckets, headers, reset_text
from kvrelay.keys_command import keys_app


def test_keys_are_stored_as_digests_and_verified_in_constant_time(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    store = KeyStore(str(path))
    key, rec = store.add("team-a", models=["m1"], rpm=10, tpm=1000)
    assert key.startswith("kvr-") and len(key) > 40
    text = path.read_text()
    assert key not in text and key[4:] not in text  # only the public id prefix and a digest
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store.load() and store.verify(key).name == "team-a"
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.verify("kvr-short") is None and store.verify("sk-other") is None
    compared = []
    import hmac as hmac_module

    real = hmac_module.compare_digest
    monkeypatch.setattr("gateway.api_keys.hmac.compare_digest", lambda a, b: compared.append(1) or real(a, b))
    store.verify(key)
    assert compared  # the digest comparison is the constant-time one
    assert rec.allows("m1") and not rec.allows("m2")
    store.revoke("team-a")
    store.load()
    assert store.verify(key) is None
    with pytest.raises(KeyError):
        store.revoke("team-a")


def test_keys_in_redis_are_shared_and_never_stored_in_clear(tmp_path, redis_url):
    a = KeyStore(str(tmp_path / "unused.json"), redis_url)
    key, _ = a.add("shared")
    b = KeyStore(str(tmp_path / "other.json"), redis_url)
    b.load()
    assert b.verify(key) is not None
    raw = b"".join(a._redis.hvals("kvrelay:api-keys"))
    assert key.encode() not in raw and key[4:].encode() not in raw
    assert not (tmp_path / "unused.json").exists()


def _app(store: KeyStore, buckets) -> FastAPI:  # noqa: ANN001
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> dict:
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    app.add_middleware(AuthMiddleware, keys=store, buckets=buckets)
    return app


def test_the_middleware_answers_401_and_429_as_openai_does(tmp_path):
    store = KeyStore(str(tmp_path / "keys.json"))
    key, rec = store.add("limited", rpm=2)
    store.load()

    async def main() -> None:
        transport = httpx.ASGITransport(app=_app(store, MemoryBuckets()))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/health")).status_code == 200  # liveness needs no key
            for auth in (None, "Bearer ", "Bearer kvr-nope", f"Basic {key}"):
                r = await c.post("/v1/completions", headers={"Authorization": auth} if auth else {})
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["code"] == "invalid_api_key"
            ok = [await c.post("/v1/completions", headers={"Authorization": f"Bearer {key}"}) for _ in range(2)]
            assert [r.status_code for r in ok] == [200, 200]
            over = await c.post("/v1/completions", headers={"Authorization": f"Bearer {key}"})
            assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(over.headers["retry-after"]) >= 1
            assert over.headers["x-ratelimit-limit-requests"] == "2"
            assert over.headers["x-ratelimit-remaining-requests"] == "0"
            assert over.headers["x-ratelimit-reset-requests"].endswith("s")

    asyncio.run(main())


def test_token_buckets_refill_and_take_back_what_was_not_used():
    async def main() -> None:
        b = MemoryBuckets()
        assert (await b.take("k:tpm", 600, 500)).ok
        short = await b.take("k:tpm", 600, 200)
        assert not short.ok and 9 < short.retry_after_s < 11  # 100 missing at 10 tokens/s
        await b.refund("k:tpm", 600, 400)  # the request used 100 of its 500
        assert (await b.take("k:tpm", 600, 200)).ok
        never = await b.take("k:tpm", 600, 601)
        assert not never.ok

    asyncio.run(main())
    assert reset_text(0.2) == "1s" and reset_text(360) == "6m0s" and reset_text(3723) == "1h2m3s"


def test_replicas_share_one_budget_through_redis_and_keys_do_not_share(redis_url):
    async def main() -> None:
        one, two = aioredis.from_url(redis_url), aioredis.from_url(redis_url)
        a, b = RedisBuckets(one), RedisBuckets(two)  # two gateway replicas
        takes = [await (a if i % 2 else b).take("key1:rpm", 4, 1) for i in range(5)]
        assert [t.ok for t in takes] == [True, True, True, True, False]
        assert takes[-1].retry_after_s > 0 and headers(takes[-1], None)["x-ratelimit-remaining-requests"] == "0"
        assert (await a.take("key2:rpm", 4, 1)).ok  # another key is unaffected
        await b.refund("key1:rpm", 4, 1)
        assert (await a.take("key1:rpm", 4, 1)).ok
        await one.aclose()
        await two.aclose()

    asyncio.run(main())


def test_the_cli_shows_a_key_once(tmp_path):
    path = str(tmp_path / "keys.json")
    run = CliRunner()
    added = run.invoke(keys_app, ["add", "alice", "--rpm", "60", "--models", "m1,m2", "--file", path])
    assert added.exit_code == 0, added.output
    key = added.stdout.strip().splitlines()[0]
    assert key.startswith("kvr-")
    listed = run.invoke(keys_app, ["ls", "--file", path, "--json"])
    row = json.loads(listed.stdout)
    assert key not in listed.output and row["name"] == "alice" and row["models"] == ["m1", "m2"] and row["rpm"] == 60
    assert "digest" not in row and "salt" not in row
    assert run.invoke(keys_app, ["add", "alice", "--file", path]).exit_code == 2  # names are unique while live
    revoked = run.invoke(keys_app, ["revoke", "alice", "--file", path])
    assert revoked.exit_code == 0 and row["id"] in revoked.output
    assert run.invoke(keys_app, ["revoke", "alice", "--file", path]).exit_code == 2


def test_an_unreachable_redis_does_not_take_the_api_down():
    from kvrelay.launcher import free_port

    async def main() -> None:
        client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
        take = await RedisBuckets(client).take("k:rpm", 5, 1)
        assert take.ok  # limits are not enforced while the shared store is gone; keys still are
        await client.aclose()

    asyncio.run(main())


def test_with_a_shared_secret_a_key_written_into_redis_by_anyone_else_is_ignored(tmp_path, redis_url):
    secret = b"s" * 32
    admin = KeyStore(str(tmp_path / "k.json"), redis_url, secret=secret)
    good, _ = admin.add("signed")
    # someone with write access to Redis but not the secret mints a key of their own
    rogue_key, rogue = KeyStore(str(tmp_path / "r.json"), redis_url).add("rogue")
    gateway = KeyStore(str(tmp_path / "g.json"), redis_url, secret=secret)
    gateway.load()
    assert gateway.verify(good) is not None and gateway.verify(rogue_key) is None
    admin.revoke("signed")  # a revocation is signed too, and taken
    gateway.load()
    assert gateway.verify(good) is None
