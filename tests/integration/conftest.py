"""Real processes on loopback ports picked at run time: workers, gateway, `kvrelay up`."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from common.engine.sampling import SamplingParams
from common.rpc import prefill_pb2, prefill_pb2_grpc, worker_pb2, worker_pb2_grpc
from common.rpc.convert import params_to_proto
from common.rpc.tls import TLSSettings
from kvrelay.launcher import Cluster, free_port, free_worker_ports
from tests.integration.client import routed
from tests.tiny_checkpoint import write_tiny_checkpoint
from tests.waiting import async_wait_for, wait_for


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama")))


@dataclass
class Running:
    cluster: Cluster
    url: str
    prefill: list[str]
    decode: list[str]

    def workers(self) -> list[str]:
        return self.prefill + self.decode


def force_pd_config(log_dir: str) -> str:
    """A scheduler YAML whose decider always disaggregates: tests of the P/D path must not be
    short-circuited to decode-only because their prompts are short."""
    path = os.path.join(log_dir, "scheduler-force-pd.yaml")
    with open(path, "w") as f:
        f.write(
            "profiles:\n"
            "  prefill: {scorers: [{type: prefix-cache, weight: 2}, {type: queue-depth, weight: 1}]}\n"
            "  decode: {scorers: [{type: kv-usage, weight: 1}, {type: running, weight: 1}]}\n"
            "decider: {enabled: false}\n"
        )
    return path


def start_cluster(
    log_dir: str,
    model: str | None,
    prefill: int = 1,
    decode: int = 1,
    transfer: str = "grpc",
    prefill_extra: list[str] | None = None,
    decode_extra: list[str] | None = None,
    timeout: float = 120.0,
    force_pd: bool = True,
    want_colocated: bool = False,
    env: dict[str, str] | None = None,
    gateway_extra: list[str] | None = None,
) -> Running:
    # The tests read where each request went from the routing headers (worker ids; off by default).
    env = {"KVRELAY_TRACING__DIR": os.path.join(log_dir, "traces"), "KVRELAY_ROUTING_HEADERS": "true", **(env or {})}
    cluster = Cluster(log_dir=log_dir, env=env)
    ports = free_worker_ports(prefill + decode)  # each with its metrics port (+ 1000) free too
    try:
        p_extra = ["--transfer", transfer, *(prefill_extra or [])]
        p = [cluster.worker("prefill", port, 1, model, p_extra) for port in ports[:prefill]]
        d_extra = ["--transfer", transfer, *(f"--prefill-peer={a}" for a in p), *(decode_extra or [])]
        d = [cluster.worker("decode", port, 1, model, d_extra) for port in ports[prefill:]]
        extra = ["--scheduler-config", force_pd_config(log_dir)] if force_pd else []
        extra += gateway_extra or []
        url = cluster.gateway(free_port(), p, d, model, extra)
        if env.get("KVRELAY_TLS__CA_FILE"):
            tls = TLSSettings(
                ca_file=env["KVRELAY_TLS__CA_FILE"],
                cert_file=env["KVRELAY_TLS__CERT_FILE"],
                key_file=env["KVRELAY_TLS__KEY_FILE"],
            )
            _WORKER_TLS.update(dict.fromkeys(p + d, tls))
        mode = "disaggregated" if prefill and not want_colocated else "colocated"
        cluster.wait_ready(url, timeout=timeout, want_mode=mode)
        # Ready needs one decode worker; a test means all it started: wait until each has answered.
        wait_for(lambda: _answered(url, p + d), timeout, "every worker to answer the gateway")
    except BaseException:
        cluster.stop()
        raise
    return Running(cluster, url, p, d)


def _answered(url: str, addresses: list[str]) -> bool:
    """Whether the gateway has heard from each of these workers (none is listed as down)."""
    pools = httpx.get(f"{url}/ready", timeout=5).json()["workers"]
    down = {a for pool in pools.values() for a in pool["down"]}
    return not down & set(addresses)


@pytest.fixture(scope="session")
def _tiny_cluster_shared(tiny_dir, tmp_path_factory) -> Iterator[Running]:
    """The cluster behind `tiny_cluster`; request that fixture, which checks for leaks after each test."""
    run = start_cluster(str(tmp_path_factory.mktemp("tiny-cluster-logs")), tiny_dir)
    yield run
    run.cluster.stop()


@pytest.fixture
def tiny_cluster(_tiny_cluster_shared) -> Iterator[Running]:
    """One 1-prefill + 1-decode cluster over gRPC transfer, shared by the tests that only send traffic.
    It is checked for leaked KV after every test that used it, so a leak fails the test that caused
    it rather than whichever test runs next."""
    yield _tiny_cluster_shared
    check_no_kv_held(_tiny_cluster_shared.workers())


@pytest.fixture
def cluster_factory(tmp_path) -> Iterator:
    """Clusters of the test's own; after the test's body, before they stop, their workers must hold no KV."""
    started: list[Running] = []

    def make(*args, **kwargs) -> Running:
        r = start_cluster(str(tmp_path), *args, **kwargs)
        started.append(r)
        return r

    yield make
    try:
        for r in started:
            check_no_kv_held(r.workers())
    finally:
        for r in started:
            r.cluster.stop()


# Workers of a cluster started with mutual TLS answer only a client with a certificate of their CA.
_WORKER_TLS: dict[str, TLSSettings] = {}


async def worker_stats(address: str, timeout: float = 5.0) -> worker_pb2.StatsResponse:
    tls = _WORKER_TLS.get(address)
    if tls is not None:
        channel = grpc.aio.secure_channel(address, tls.channel_credentials())
    else:
        channel = grpc.aio.insecure_channel(address)
    async with channel as ch:
        return await worker_pb2_grpc.WorkerServiceStub(ch).Stats(worker_pb2.StatsRequest(), timeout=timeout)


async def assert_workers_clean(addresses: list[str], wait_s: float = 5.0) -> None:
    """No request holds KV on any worker: nothing running, waiting or pinned, every block free.
    A request that just finished frees its blocks a moment later, hence the wait."""
    dirty: list[worker_pb2.StatsResponse] = []

    async def clean() -> bool:
        nonlocal dirty
        stats = [await worker_stats(a) for a in addresses]
        dirty = [s for s in stats if s.running or s.waiting or s.pinned or _blocks_held(s)]
        return not dirty

    try:
        await async_wait_for(clean, wait_s, "every worker to free its KV")
    except AssertionError:
        held = [(s.worker_id, s.running, s.waiting, s.pinned, s.free_blocks, s.total_blocks) for s in dirty]
        raise AssertionError(
            f"KV still held after {wait_s:.0f}s (worker, running, waiting, pinned, free, total blocks): {held}"
        ) from None


def _blocks_held(s: worker_pb2.StatsResponse) -> bool:
    """Any loaded model of the worker with a block not free (the top-level counts are the first model's)."""
    return s.free_blocks != s.total_blocks or any(m.loaded and m.free_blocks != m.total_blocks for m in s.models)


def check_no_kv_held(addresses: list[str], wait_s: float = 5.0) -> None:
    """The leak check every cluster fixture runs after its test: the workers that still answer hold no
    KV. Workers the test stopped or killed on purpose no longer answer and are skipped. The deadline
    is shorter than a prefill lease (10 s), so blocks a lease would free late still count as leaked."""

    async def main() -> None:
        live = []
        for a in addresses:
            try:
                await worker_stats(a, timeout=2.0)
            except grpc.aio.AioRpcError:
                continue
            live.append(a)
        if live:
            await assert_workers_clean(live, wait_s)

    asyncio.run(main())


_probe_rng = random.Random()  # its own: a test that seeds the global one must not repeat probe blocks


def wait_until_gateway_follows(url: str, worker: str, block_size: int = 16, timeout: float = 30.0) -> None:
    """Wait until the gateway's prefix index holds every KV event `worker` published so far.

    The index is not observable from outside, so this stores one fresh block on the worker (directly
    over gRPC: its events come after all earlier ones) and probes the gateway with a prompt starting
    with that block until the gateway routes it to `worker` predicting the block cached there. Events
    are applied in order, so the earlier ones are in the index too. A probe sent too early may land on
    another worker; it leaves only that unrelated block there."""
    block = [_probe_rng.randrange(1, 251) for _ in range(block_size)]
    request_id = f"follow-probe-{uuid.uuid4().hex[:8]}"

    async def store() -> None:  # max_tokens=1: the request ends with its first token, nothing stays pinned
        params = params_to_proto(SamplingParams.create(max_tokens=1))
        async with grpc.aio.insecure_channel(worker) as ch:
            await prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(
                prefill_pb2.PrefillRequest(request_id=request_id, token_ids=[*block, 1], params=params), timeout=30
            )

    asyncio.run(store())
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

    def follows() -> bool:
        body = {"model": model, "prompt": [*block, 2], "max_tokens": 1, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        predicted = int(r.headers["x-kvrelay-predicted-cached-tokens"])
        return routed(r, "prefill") == worker and predicted == block_size

    wait_for(follows, timeout, f"{url} to follow the KV events of {worker}")


def logs_of(tmp_path) -> str:
    return "\n".join(f"--- {f}\n{open(os.path.join(tmp_path, f)).read()[-2000:]}" for f in os.listdir(tmp_path))
