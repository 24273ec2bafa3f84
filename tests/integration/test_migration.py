"""Streams survive the death or stall of their decode worker: the gateway migrates them, and with
greedy sampling the client's one stream is token for token the uninterrupted output. When no
worker is left, the stream ends with an OpenAI error event, never a silent stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest

from tests.integration.client import metric, model_id, routed
from tests.integration.conftest import assert_workers_clean
from tests.waiting import wait_for

PROMPT = "tell me a long story about a ship and its crew"
MAX_TOKENS = 300


def _process(cluster, address: str):  # noqa: ANN001, ANN202
    port = address.rsplit(":", 1)[1]
    return next(p for name, p in cluster.cluster.procs if name.endswith(f"-{port}") and "gateway" not in name)


async def _stream(url: str, on_tokens=None) -> dict:  # noqa: ANN001
    """One greedy streamed chat; returns token ids, finish reason, usage, errors and whether [DONE] came."""
    async with httpx.AsyncClient(timeout=60) as client:
        body = {
            "model": await model_id(client, url),
            "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "return_token_ids": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        got: dict = {"ids": [], "finish": None, "usage": None, "error": None, "done": False}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            got["decode"] = routed(r, "decode")
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    got["done"] = True
                elif line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        got["error"] = obj["error"]
                        continue
                    got["usage"] = obj.get("usage") or got["usage"]
                    for c in obj["choices"]:
                        got["ids"] += c.get("token_ids", [])
                        got["finish"] = c["finish_reason"] or got["finish"]
                    if on_tokens is not None:
                        await on_tokens(got)
        return got


def _ready(url: str) -> dict:
    return httpx.get(f"{url}/ready").json()


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_a_stream_survives_its_decode_worker(cluster_factory, tiny_dir, fault):
    # a frozen worker is noticed after 3 s; a loaded machine may need more than one migration
    env = {"KVRELAY_MIGRATION__STALL_TIMEOUT_S": "3", "KVRELAY_MIGRATION__MAX_ATTEMPTS": "6"}
    c = cluster_factory(tiny_dir, prefill=1, decode=2, env=env)
    wait_for(lambda: len(_ready(c.url)["workers"]["decode"]["healthy"]) == 2, 60, "both decode workers up")
    reference = asyncio.run(_stream(c.url))
    assert reference["finish"] == "length" and len(reference["ids"]) == MAX_TOKENS

    state: dict = {}

    async def hurt_its_worker(got: dict) -> None:
        if len(got["ids"]) >= 20 and "victim" not in state:
            state["victim"] = proc = _process(c, got["decode"])
            os.kill(proc.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            state["at"] = len(got["ids"])

    got = asyncio.run(_stream(c.url, hurt_its_worker))
    assert state["at"] < MAX_TOKENS  # the fault came mid-stream
    assert got["error"] is None and got["done"] and got["finish"] == "length"
    assert got["ids"] == reference["ids"]  # no token lost, none repeated, same tokens
    assert got["usage"]["completion_tokens"] == MAX_TOKENS
    assert got["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]
    assert _metric(c.url, "kvrelay_gateway_migrations_total{") >= 1
    survivors = [a for a in c.workers() if a != got["decode"]]
    if fault == "stall":
        os.kill(state["victim"].pid, signal.SIGCONT)  # it resumes, sees the cancelled call, frees the KV
        survivors = c.workers()
    asyncio.run(assert_workers_clean(survivors, wait_s=10))


def test_a_stream_with_no_worker_left_ends_with_an_error_event(cluster_factory, tiny_dir):
    c = cluster_factory(tiny_dir, prefill=1, decode=1)

    async def kill_the_only_decode_worker(got: dict) -> None:
        if len(got["ids"]) >= 10 and "killed" not in got:
            got["killed"] = True
            os.kill(_process(c, got["decode"]).pid, signal.SIGKILL)

    got = asyncio.run(_stream(c.url, kill_the_only_decode_worker))
    assert got["error"] is not None and got["error"]["type"] == "server_error", got
    assert not got["done"] and got["finish"] is None
    # counted as lost, not as a success
    lost = {"outcome": "worker_lost", "finish_reason": "error"}
    wait_for(lambda: metric(c.url, "kvrelay_gateway_requests_total", **lost) == 1, 10, "the request counted as lost")
    assert metric(c.url, "kvrelay_gateway_requests_total", outcome="ok") == 0
    asyncio.run(assert_workers_clean(c.prefill, wait_s=10))


def test_a_stream_survives_its_prefill_worker_dying_before_the_pull(cluster_factory, tiny_dir):
    """The prefill worker answers (the client has its first token) and dies before the decode worker
    pulled the KV: the pull fails, and the gateway prefills prompt + first token again elsewhere."""
    c = cluster_factory(tiny_dir, prefill=1, decode=1)
    reference = asyncio.run(_stream(c.url))
    decode = _process(c, c.decode[0])
    prefill = _process(c, c.prefill[0])
    state: dict = {}

    async def kill_prefill_before_the_pull(got: dict) -> None:
        if got["ids"] and "killed" not in state:
            state["killed"] = len(got["ids"])
            os.kill(prefill.pid, signal.SIGKILL)
            await asyncio.to_thread(prefill.wait, 10)  # gone for sure (reaped) before the pull starts
            os.kill(decode.pid, signal.SIGCONT)  # now it pulls, from a worker that is gone

    os.kill(decode.pid, signal.SIGSTOP)  # the Decode call (and its pull) waits until we let it go
    try:
        got = asyncio.run(_stream(c.url, kill_prefill_before_the_pull))
    finally:
        os.kill(decode.pid, signal.SIGCONT)
    assert state["killed"] == 1  # the fault came after the first token and before any decoded one
    assert got["error"] is None and got["done"] and got["ids"] == reference["ids"]
    assert got["usage"]["completion_tokens"] == MAX_TOKENS
    assert _metric(c.url, 'kvrelay_gateway_migrations_total{reason="kv_transfer_failed"}') >= 1
    asyncio.run(assert_workers_clean(c.decode, wait_s=10))
