"""Worker pools that grow and shrink through the Redis registry, with real processes and a real
redis-server: a worker joins and takes traffic; workers drain under load with no failed request;
two gateways share KV events and route a prefix alike, and one resyncs after losing events; a
restarted gateway finds the workers and their caches again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
import redis

from common.discovery.event_stream import decode_entry
from common.discovery.record import RegistryKeys, WorkerRecord
from common.rpc import worker_pb2, worker_pb2_grpc
from kvrelay.launcher import Cluster, free_port, free_worker_ports
from kvrelay.redis_server import redis_server
from tests.integration.client import routed
from tests.integration.conftest import check_no_kv_held, force_pd_config, wait_until_gateway_follows
from tests.waiting import async_wait_for, wait_for

KEYS = RegistryKeys()
PREFIX = [(7 * i) % 250 + 1 for i in range(96)]  # 6 full blocks of 16


@dataclass
class RegCluster:
    cluster: Cluster
    redis_url: str
    model: str
    log_dir: str
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)

    def add_worker(self, role: str) -> str:
        extra = ["--registry", self.redis_url, "--log-level", "info"]
        extra += ["--transfer", "grpc"] if role == "decode" else []
        addr = self.cluster.worker(role, free_worker_ports(1)[0], 1, self.model, extra)
        (self.prefill if role == "prefill" else self.decode).append(addr)
        return addr

    def add_gateway(self) -> str:
        extra = ["--registry", self.redis_url, "--scheduler-config", force_pd_config(self.log_dir)]
        url = self.cluster.gateway(free_port(), [], [], self.model, extra)
        self.gateways.append(url)
        return url

    def proc(self, name_prefix: str):  # noqa: ANN201
        return next(p for n, p in self.cluster.procs if n.startswith(name_prefix))

    def wait_pools(self, url: str, prefill: int, decode: int, timeout: float = 60.0) -> None:
        def pools_seen() -> bool:
            self.cluster.check_alive()
            try:
                w = httpx.get(f"{url}/ready", timeout=2).json().get("workers", {})
                return len(w["prefill"]["healthy"]) == prefill and len(w["decode"]["healthy"]) == decode
            except (httpx.HTTPError, KeyError, json.JSONDecodeError):
                return False

        wait_for(pools_seen, timeout, f"{url} to see {prefill}+{decode} healthy workers")

    def wait_published(self, worker: str) -> None:
        """Until the worker's event stream in Redis holds every KV event the worker has logged."""
        rc = redis.Redis.from_url(self.redis_url)
        records = [WorkerRecord.decode(rc.get(k)) for k in rc.scan_iter(KEYS.worker_pattern)]
        stream = next(r.events_stream for r in records if r.address == worker)

        async def logged() -> int:
            async with grpc.aio.insecure_channel(worker) as ch:
                call = worker_pb2_grpc.WorkerServiceStub(ch).WatchEvents(worker_pb2.WatchEventsRequest(), timeout=10)
                first = await call.read()  # after_seq 0: a snapshot, current to the log's last seq
                call.cancel()
                return first.last_seq

        last = asyncio.run(logged())

        def published() -> bool:
            entries = rc.xrevrange(stream, count=1)
            return bool(entries) and decode_entry(entries[0][1])[-1].seq >= last

        wait_for(published, 10, f"{worker} to publish its KV events up to seq {last}")


@pytest.fixture
def reg_cluster(redis_url, tiny_dir, tmp_path) -> Iterator:
    clusters: list[RegCluster] = []

    def make(prefill: int, decode: int, gateways: int = 1, env: dict[str, str] | None = None) -> RegCluster:
        cluster = Cluster(log_dir=str(tmp_path), env={"KVRELAY_ROUTING_HEADERS": "true", **(env or {})})
        c = RegCluster(cluster, redis_url, tiny_dir, str(tmp_path))
        clusters.append(c)
        for _ in range(prefill):
            c.add_worker("prefill")
        for _ in range(decode):
            c.add_worker("decode")
        for _ in range(gateways):
            c.wait_pools(c.add_gateway(), prefill, decode, timeout=120)
        return c

    yield make
    try:
        for c in clusters:
            check_no_kv_held(c.prefill + c.decode)
    finally:
        for c in clusters:
            c.cluster.stop()


def complete(url: str, prompt: list[int], max_tokens: int = 2) -> httpx.Response:
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    r = httpx.post(
        f"{url}/v1/completions",
        timeout=60,
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    return r


def cached(r: httpx.Response) -> tuple[int, int]:
    """(predicted by the gateway, reported by the worker) cached prompt tokens."""
    return int(r.headers["x-kvrelay-predicted-cached-tokens"]), r.json()["usage"]["prompt_tokens_details"][
        "cached_tokens"
    ]


def test_a_new_worker_registers_and_takes_traffic(reg_cluster):
    c = reg_cluster(prefill=1, decode=1)
    url = c.gateways[0]
    r = redis.Redis.from_url(c.redis_url)
    assert len(list(r.scan_iter(KEYS.worker_pattern))) == 2
    new = c.add_worker("decode")
    t0 = time.monotonic()
    c.wait_pools(url, 1, 2, timeout=60)
    joined_s = time.monotonic() - t0

    async def burst() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
            body = {"model": model, "prompt": "tell me", "max_tokens": 24, "ignore_eos": True}
            rs = await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body) for _ in range(8)))
        assert all(x.status_code == 200 for x in rs), [x.text for x in rs]
        return [routed(x, "decode") for x in rs]

    used = asyncio.run(burst())
    assert new in used, f"the new decode worker took no traffic ({joined_s:.1f}s after start): {used}"


def test_workers_drain_under_load_without_failures(reg_cluster):
    """SIGTERM one prefill and one decode worker while requests stream: every request succeeds,
    both exit 0 after deregistering, and the survivors serve what follows."""
    c = reg_cluster(prefill=2, decode=2)
    url = c.gateways[0]
    victims = [("prefill", c.prefill[0]), ("decode", c.decode[0])]
    procs = {a: c.proc(f"{role}-{a.rsplit(':', 1)[1]}") for role, a in victims}
    results: list[tuple[int, str | None, str]] = []
    in_flight = 0

    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]

            async def one(i: int) -> None:
                nonlocal in_flight
                in_flight += 1
                body = {"model": model, "prompt": f"request {i}", "max_tokens": 32, "ignore_eos": True}
                try:
                    if i % 2:
                        r = await client.post(f"{url}/v1/completions", json=body)
                        fin = r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else r.text
                        results.append((r.status_code, fin, routed(r, "decode")))
                        return
                    fin = None
                    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                fin = json.loads(line[6:])["choices"][0]["finish_reason"] or fin
                        results.append((r.status_code, fin, routed(r, "decode")))
                finally:
                    in_flight -= 1

            i = 0
            while not stop.is_set():
                await asyncio.gather(*(one(i + k) for k in range(4)))
                i += 4

    async def streaming() -> bool:  # a round was served and the next one is under way
        return len(results) >= 4 and in_flight > 0

    async def exited() -> bool:
        return all(p.poll() is not None for p in procs.values())

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(load(stop))
        try:
            await async_wait_for(streaming, 60, "the load to flow")
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            await async_wait_for(exited, 30, "the drained workers to exit")
            served = len(results)

            async def survivors_serve() -> bool:
                return len(results) >= served + 4

            await async_wait_for(survivors_serve, 60, "the survivors to serve more requests")
        finally:
            stop.set()
            await task

    asyncio.run(scenario())
    assert [p.returncode for p in procs.values()] == [0, 0]
    failed = [x for x in results if x[0] != 200 or x[1] != "length"]
    assert not failed and len(results) >= 8, f"{len(failed)} of {len(results)} failed: {failed[:3]}"
    rc = redis.Redis.from_url(c.redis_url)
    left = {WorkerRecord.decode(rc.get(k)).address for k in rc.scan_iter(KEYS.worker_pattern)}
    assert left == {c.prefill[1], c.decode[1]}, "the drained workers must have deregistered"
    after = complete(url, [5, 6, 7], max_tokens=4)
    assert routed(after, "decode") == c.decode[1]


def test_two_gateways_route_alike_and_a_lagging_one_resyncs(reg_cluster):
    c = reg_cluster(prefill=2, decode=1, gateways=2)
    a, b = c.gateways
    first = complete(a, PREFIX + [1, 2, 3])
    owner = routed(first, "prefill")
    wait_until_gateway_follows(b, owner)  # the stored-block events reached B through Redis

    for k in range(3):  # gateway B never saw these requests, only their KV events
        r = complete(b, PREFIX + [10 + k])
        assert routed(r, "prefill") == owner
        assert cached(r) == (96, 96)

    # Gateway A freezes. A blocked stream read it had already issued still receives the next entry
    # (into its socket); the entries after that are trimmed away before it can read them.
    gw_a = c.proc(f"gateway-{a.rsplit(':', 1)[1]}")
    other = [(11 * i) % 250 + 1 for i in range(96)]
    grown = [(13 * i) % 250 + 1 for i in range(16)]  # a 7th block after `other`
    gw_a.send_signal(signal.SIGSTOP)
    try:
        moved = complete(b, other + [1])
        owner2 = routed(moved, "prefill")
        wait_until_gateway_follows(b, owner2)
        assert routed(complete(b, other + grown + [1]), "prefill") == owner2
        c.wait_published(owner2)  # trimmed now, the stream can only continue after a hole
        rc = redis.Redis.from_url(c.redis_url)
        for key in rc.scan_iter(f"{KEYS.prefix}:kv-events:*"):
            rc.xtrim(key, maxlen=0)
        # new events on the same worker, after the hole
        assert routed(complete(b, other + grown[::-1] + [1]), "prefill") == owner2
        c.wait_published(owner2)
    finally:
        gw_a.send_signal(signal.SIGCONT)

    def resynced() -> bool:
        m = httpx.get(f"{a}/metrics").text
        line = next(x for x in m.splitlines() if x.startswith("kvrelay_gateway_kv_event_resyncs_total "))
        return float(line.split()[1]) >= 1

    wait_for(resynced, 15, "gateway A to detect the gap and resync")
    wait_until_gateway_follows(a, owner2)  # the snapshot it resynced from has arrived
    r = complete(a, other + grown + [2, 3])
    assert routed(r, "prefill") == owner2
    assert cached(r) == (112, 112), "after the resync, gateway A knows the block it never saw an event for"


def test_registry_survives_a_gateway_restart(reg_cluster):
    c = reg_cluster(prefill=2, decode=1)
    first = complete(c.gateways[0], PREFIX + [1])
    gw = c.proc("gateway-")
    gw.send_signal(signal.SIGTERM)
    assert gw.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    c.cluster.procs = [(n, p) for n, p in c.cluster.procs if p is not gw]
    url = c.add_gateway()  # a new gateway given nothing but the registry
    c.wait_pools(url, 2, 1, timeout=60)
    wait_until_gateway_follows(url, routed(first, "prefill"))  # its index rebuilt from snapshots
    r = complete(url, PREFIX + [2])
    assert routed(r, "prefill") == routed(first, "prefill")
    assert cached(r) == (96, 96)


def test_a_worker_whose_registry_is_unreachable_says_so(tiny_dir, tmp_path):
    cluster = Cluster(log_dir=str(tmp_path))
    url = f"redis://127.0.0.1:{free_port()}/0"
    cluster.worker("decode", free_worker_ports(1)[0], 1, tiny_dir, ["--registry", url])
    proc = cluster.procs[-1][1]
    try:
        assert proc.wait(120) == 2
    finally:
        cluster.stop()
    log = next(tmp_path.glob("decode-*.log")).read_text()
    assert f"cannot reach the registry at {url}" in log and "Traceback" not in log


def test_a_record_not_signed_with_the_deployment_secret_is_ignored(reg_cluster, tmp_path):
    """A stray process that can write to Redis cannot join a pool: with a shared secret, gateways
    (and decode workers choosing KV sources) accept only records signed with it."""
    secret = tmp_path / "shared-secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    c = reg_cluster(prefill=1, decode=1, env={"KVRELAY_SHARED_SECRET_FILE": str(secret)})
    url = c.gateways[0]
    rc = redis.Redis.from_url(c.redis_url)
    real = WorkerRecord.decode(rc.get(KEYS.worker(f"decode-{c.decode[0].rsplit(':', 1)[1]}")))
    assert real.signature  # the real workers sign theirs
    impostor = real.model_copy(update={"worker_id": "impostor", "address": "127.0.0.1:9", "signature": ""})
    forged = real.model_copy(update={"worker_id": "forger", "address": "127.0.0.1:10", "signature": "00" * 32})
    # A record signed with the secret, written with them: once the gateway lists it, it has read all three.
    canary = real.model_copy(update={"worker_id": "canary", "address": "127.0.0.1:11"}).signed(
        secret.read_bytes().strip()
    )
    for rec in (impostor, forged, canary):  # written as a worker would: the record and the index entry
        rc.set(KEYS.worker(rec.worker_id), rec.encode(), ex=60)
        rc.sadd(KEYS.index, rec.worker_id)

    def listed() -> set[str]:
        pools = httpx.get(f"{url}/ready", timeout=5).json()["workers"]
        return {a for pool in pools.values() for group in pool.values() for a in group}

    wait_for(lambda: "127.0.0.1:11" in listed(), 15, "the gateway to read the new records")
    assert not {"impostor", "forger", "127.0.0.1:9", "127.0.0.1:10"} & listed()
    r = complete(url, [1, 2, 3], max_tokens=4)
    assert r.status_code == 200 and routed(r, "decode") == c.decode[0]


def test_a_registry_over_tls_that_requires_a_password(tiny_dir, tmp_path):
    """Workers and gateways reach a password-protected Redis over TLS (`rediss://`, the password and
    the CA file in the URL); without the password, Redis refuses them and a worker says so and exits."""
    with redis_server(str(tmp_path), password="s3cret-" + os.urandom(8).hex(), tls=True) as url:
        cluster = Cluster(log_dir=str(tmp_path), env={"KVRELAY_ROUTING_HEADERS": "true"})
        c = RegCluster(cluster, url, tiny_dir, str(tmp_path))
        try:
            c.add_worker("prefill")
            c.add_worker("decode")
            c.wait_pools(c.add_gateway(), 1, 1, timeout=120)
            assert complete(c.gateways[0], [1, 2, 3], max_tokens=4).status_code == 200
            check_no_kv_held(c.prefill + c.decode)
            no_password = url.split("@", 1)[1]
            cluster.worker("decode", free_worker_ports(1)[0], 1, tiny_dir, ["--registry", f"rediss://{no_password}"])
            assert cluster.procs[-1][1].wait(120) == 2
            logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
            assert url.split("@", 1)[0].split(":")[-1] not in logs  # the password never reaches a log
        finally:
            cluster.stop()
