"""Back-pressure and abandoned work, on real processes: over capacity is a 429 with Retry-After
(batch shed first), a client that leaves aborts its request on the workers, slow-header
connections are dropped, and SIGTERM drains the gateway before it exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import httpx
import pytest

from tests.integration.client import model_id
from tests.integration.conftest import assert_workers_clean
from tests.waiting import async_wait_for, wait_for


def _proc(c, name_prefix: str, address: str | None = None):  # noqa: ANN001, ANN202
    port = address.rsplit(":", 1)[1] if address else c.url.rsplit(":", 1)[1]
    return next(p for name, p in c.cluster.procs if name == f"{name_prefix}-{port}")


def _chat(model: str, stream: bool = False, max_tokens: int = 8, **extra: object) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there " * 20}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


async def _gateway_metric(client: httpx.AsyncClient, url: str, metric: str) -> float:
    """The gateway's metric, summed over the series whose line starts with `metric`."""
    text = (await client.get(f"{url}/metrics")).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(metric))


async def _gateway_shows(client: httpx.AsyncClient, url: str, metric: str, value: float) -> None:
    async def shows() -> bool:
        return await _gateway_metric(client, url, metric) == value

    await async_wait_for(shows, 10, f"{metric} to reach {value}")


def _prefills_done(address: str) -> float:
    """How many prefills this worker completed (its own Prometheus counter)."""
    port = int(address.rsplit(":", 1)[1]) + 1000
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    needle = 'kvrelay_worker_requests_total{outcome="ok",role="prefill",rpc="Prefill"}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(needle))


@pytest.fixture
def small_queue(cluster_factory, tiny_dir):  # noqa: ANN201
    env = {"KVRELAY_ADMISSION__MAX_WAITING_PER_WORKER": "2", "KVRELAY_ADMISSION__BATCH_SHARE": "0.5"}
    return cluster_factory(tiny_dir, prefill=1, decode=1, env=env)


def test_over_capacity_is_a_429_and_batch_is_shed_first(small_queue):
    c = small_queue
    prefill = _proc(c, "prefill", c.prefill[0])

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            model = await model_id(client, c.url)
            os.kill(prefill.pid, signal.SIGSTOP)  # nothing gets its first token: the queue only grows
            try:
                first = asyncio.create_task(client.post(f"{c.url}/v1/chat/completions", json=_chat(model)))
                await _gateway_shows(client, c.url, "kvrelay_gateway_requests_waiting", 1)  # admitted, waits
                batch = await client.post(
                    f"{c.url}/v1/chat/completions", json=_chat(model), headers={"X-Kvrelay-Priority": "batch"}
                )
                assert batch.status_code == 429, batch.text  # batch may use only half the queue
                err = batch.json()["error"]
                assert err["type"] == "server_overloaded" and err["code"] == "queue_full"
                assert int(batch.headers["retry-after"]) >= 1
                second = asyncio.create_task(client.post(f"{c.url}/v1/chat/completions", json=_chat(model)))
                # interactive still gets the slot batch could not take (2 of 2)
                await _gateway_shows(client, c.url, "kvrelay_gateway_requests_waiting", 2)
                third = await client.post(f"{c.url}/v1/chat/completions", json=_chat(model, priority="interactive"))
                assert third.status_code == 429, third.text
            finally:
                os.kill(prefill.pid, signal.SIGCONT)
            for task in (first, second):  # every admitted request is served
                r = await task
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["finish_reason"] == "length"
            await assert_workers_clean(c.workers())

    asyncio.run(run())


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_during_prefill_aborts_it(cluster_factory, tiny_dir, stream):
    c = cluster_factory(tiny_dir, prefill=1, decode=1)
    prefill = _proc(c, "prefill", c.prefill[0])
    done_before = _prefills_done(c.prefill[0])

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            model = await model_id(client, c.url)
            os.kill(prefill.pid, signal.SIGSTOP)
            try:
                task = asyncio.create_task(client.post(f"{c.url}/v1/chat/completions", json=_chat(model, stream)))
                await _gateway_shows(client, c.url, "kvrelay_gateway_requests_waiting", 1)
                task.cancel()  # the client hangs up while its prompt waits for prefill
                await asyncio.gather(task, return_exceptions=True)
                # the gateway notices and cancels the call
                await _gateway_shows(client, c.url, "kvrelay_gateway_requests_waiting", 0)
            finally:
                os.kill(prefill.pid, signal.SIGCONT)
            await assert_workers_clean(c.workers())

    asyncio.run(run())
    assert _prefills_done(c.prefill[0]) == done_before  # the prefill never ran to the end


def test_slow_header_connections_are_dropped(cluster_factory, tiny_dir):
    c = cluster_factory(tiny_dir, prefill=0, decode=1, want_colocated=True, env={"KVRELAY_HEADER_TIMEOUT_S": "1"})
    host, port = c.url.removeprefix("http://").rsplit(":", 1)
    socks = []
    for _ in range(20):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        s.settimeout(5)
        socks.append(s)
    t0 = time.monotonic()
    assert all(s.recv(1024) == b"" for s in socks)  # closed by the server
    assert time.monotonic() - t0 < 4
    for s in socks:
        s.close()
    assert httpx.get(f"{c.url}/health").status_code == 200


def test_sigterm_drains_the_gateway_and_exits_zero(cluster_factory, tiny_dir):
    c = cluster_factory(tiny_dir, prefill=1, decode=1, env={"KVRELAY_DRAIN_NOTICE_S": "0.5"})
    gateway = _proc(c, "gateway")

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            model = await model_id(client, c.url)
            body = _chat(model, stream=True, max_tokens=300, ignore_eos=True)
            async with client.stream("POST", f"{c.url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                await anext(lines)
                gateway.send_signal(signal.SIGTERM)

                async def not_ready() -> bool:
                    return (await client.get(f"{c.url}/ready")).status_code == 503

                await async_wait_for(not_ready, 2, "/ready to answer 503")
                rest = [line async for line in lines]
            assert rest[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in rest

    asyncio.run(run())
    wait_for(lambda: gateway.poll() is not None, 20, "the gateway to exit")
    assert gateway.returncode == 0


def test_no_decode_kv_for_the_request_is_a_429_before_any_work(cluster_factory, tiny_dir):
    """The decode worker has 1 MB of KV (128 blocks of 16 tokens on the tiny model). With its answers
    held back, the gateway counts the blocks it has promised it and refuses the request that would
    not fit, instead of letting the import wait out the prefill lease and fail after a 200."""
    c = cluster_factory(tiny_dir, prefill=1, decode=1, decode_extra=["--kv-cache-mb", "1"])
    decode = _proc(c, "decode", c.decode[0])

    def body(model: str) -> dict:  # 400 prompt tokens + 1: 26 blocks
        return {"model": model, "prompt": [7] * 400, "max_tokens": 4, "temperature": 0, "ignore_eos": True}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            model = await model_id(client, c.url)
            base = await _gateway_metric(client, c.url, 'kvrelay_gateway_scheduled_worker_total{role="decode"')
            os.kill(decode.pid, signal.SIGSTOP)  # imports wait: their blocks stay promised, not reported
            try:
                held = [asyncio.create_task(client.post(f"{c.url}/v1/completions", json=body(model))) for _ in range(4)]
                # 4 x 26 = 104 of 128 blocks promised
                await _gateway_shows(client, c.url, 'kvrelay_gateway_scheduled_worker_total{role="decode"', base + 4)
                r = await client.post(f"{c.url}/v1/completions", json=body(model))
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "kv_cache_full" and "retry-after" in r.headers
            finally:
                os.kill(decode.pid, signal.SIGCONT)
            for task in held:
                assert (await task).status_code == 200
            await assert_workers_clean(c.workers())

    asyncio.run(run())
