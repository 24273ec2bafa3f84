"""Real processes on loopback ports picked at run time: workers, gateway, `kvrelay up`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from common.rpc import worker_pb2, worker_pb2_grpc
from kvrelay.launcher import Cluster, free_port
from tests.tiny_checkpoint import write_tiny_checkpoint


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
    env = {"KVRELAY_TRACING__DIR": os.path.join(log_dir, "traces"), **(env or {})}
    cluster = Cluster(log_dir=log_dir, env=env)
    try:
        p = [cluster.worker("prefill", free_port(), 1, model, prefill_extra) for _ in range(prefill)]
        d = [
            cluster.worker("decode", free_port(), 1, model, ["--transfer", transfer, *(decode_extra or [])])
            for _ in range(decode)
        ]
        extra = ["--scheduler-config", force_pd_config(log_dir)] if force_pd else []
        extra += gateway_extra or []
        url = cluster.gateway(free_port(), p, d, model, transfer, extra)
        mode = "disaggregated" if prefill and not want_colocated else "colocated"
        cluster.wait_ready(url, timeout=timeout, want_mode=mode)
    except BaseException:
        cluster.stop()
        raise
    return Running(cluster, url, p, d)


@pytest.fixture(scope="session")
def tiny_cluster(tiny_dir, tmp_path_factory) -> Iterator[Running]:
    """One 1-prefill + 1-decode cluster over gRPC transfer, shared by the tests that only send traffic."""
    run = start_cluster(str(tmp_path_factory.mktemp("tiny-cluster-logs")), tiny_dir)
    yield run
    run.cluster.stop()


@pytest.fixture
def cluster_factory(tmp_path) -> Iterator:
    started: list[Running] = []

    def make(*args, **kwargs) -> Running:
        r = start_cluster(str(tmp_path), *args, **kwargs)
        started.append(r)
        return r

    yield make
    for r in started:
        r.cluster.stop()


async def worker_stats(address: str) -> worker_pb2.StatsResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        return await worker_pb2_grpc.WorkerServiceStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)


async def assert_workers_clean(addresses: list[str], wait_s: float = 5.0) -> None:
    """No request holds KV on any worker: nothing running, waiting or pinned, every block free."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        stats = [await worker_stats(a) for a in addresses]
        dirty = [s for s in stats if s.running or s.waiting or s.pinned or s.free_blocks != s.total_blocks]
        if not dirty:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"KV still held: {[(s.worker_id, s.running, s.pinned, s.free_blocks, s.total_blocks) for s in dirty]}"
            )
        await asyncio.sleep(0.1)


def logs_of(tmp_path) -> str:
    return "\n".join(f"--- {f}\n{open(os.path.join(tmp_path, f)).read()[-2000:]}" for f in os.listdir(tmp_path))
