"""`kvrelay bench transfer`: KV blocks between two processes, per backend, beside an in-process copy.

A real prefill worker process pins a prompt's blocks; this process plays the decode side with a
cache of the same layout and pulls those blocks repeatedly with each backend (the prefill side's
lease is extended on every pull). Sizes are rounded up to whole blocks. Medians of `repeats`.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import tempfile
import time

import grpc
import torch

from common.engine.sampling import SamplingParams
from common.kv.cache import KVCache
from common.rpc import prefill_pb2, prefill_pb2_grpc, worker_pb2, worker_pb2_grpc
from common.rpc.channels import ChannelPool
from common.rpc.convert import layout_from_proto, params_to_proto
from kvrelay.launcher import Cluster, free_port
from kvtransfer.base import KVTransferClient, make_client
from kvtransfer.nixl_backend import nixl_available
from kvtransfer.release import release


def _copy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm: pages touched
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


async def _run(model: str | None, sizes_mb: list[int], repeats: int, prompt_len: int, log_dir: str) -> dict:
    # Repeated pulls of one handle: a lease (and handle) long enough for all of them.
    cluster = Cluster(log_dir=log_dir, env={"KVRELAY_ENGINE__LEASE_SECONDS": "600"})
    port = free_port()
    serve = ["--transfer", "nixl"] if nixl_available() else []
    address = cluster.worker("prefill", port, 1, model, ["--kv-cache-mb", "512", *serve])
    channels = ChannelPool()
    try:
        stats = await _wait_for_worker(channels, address, cluster)
        layout = layout_from_proto(stats.layout)
        max_blocks = math.ceil(max(max(sizes_mb) * 2**20 / layout.block_bytes, prompt_len / layout.block_size)) + 1
        local = KVCache(layout, max_blocks)
        backends = ["grpc"] + (["nixl"] if nixl_available() and "nixl" in stats.transfer_backends else [])
        clients: dict[str, KVTransferClient] = {b: make_client(b, local, channels, f"bench-{b}") for b in backends}
        prefill = prefill_pb2_grpc.PrefillServiceStub(channels.get(address))
        rng = random.Random(0)
        params = params_to_proto(SamplingParams.create(max_tokens=4, ignore_eos=True))

        async def pin(tokens: int, tag: str) -> tuple[prefill_pb2.PrefillResponse, float]:
            ids = [rng.randrange(100, 40000) for _ in range(tokens)]
            t0 = time.perf_counter()
            resp = await prefill.Prefill(
                prefill_pb2.PrefillRequest(request_id=tag, token_ids=ids, params=params), timeout=600
            )
            return resp, time.perf_counter() - t0

        async def pull_seconds(handle, backend: str) -> float:
            n = len(handle.block_ids)
            await clients[backend].pull(handle, list(range(n)), timeout=60)  # warm-up (handshake, agent)
            times = []
            for _ in range(repeats):
                r = await clients[backend].pull(handle, list(range(n)), timeout=60)
                times.append(r.seconds)
            return statistics.median(times)

        result: dict = {"block_bytes": layout.block_bytes, "backends": backends, "sizes": {}}
        for mb in sizes_mb:
            blocks = math.ceil(mb * 2**20 / layout.block_bytes)
            resp, _ = await pin(blocks * layout.block_size, f"size-{mb}")
            nbytes = len(resp.handle.block_ids) * layout.block_bytes
            row = {"bytes": nbytes, "copy_gbps": round(_copy_gbps(nbytes, repeats), 3)}
            for b in backends:
                row[f"{b}_gbps"] = round(nbytes / await pull_seconds(resp.handle, b) / 1e9, 3)
            await release(channels, resp.handle)
            result["sizes"][str(mb)] = row
        resp, prefill_s = await pin(prompt_len, "share")
        share = {"prompt_tokens": prompt_len, "prefill_s": round(prefill_s, 3)}
        for b in backends:
            t = await pull_seconds(resp.handle, b)
            share[f"{b}_s"] = round(t, 5)
            share[f"{b}_share"] = round(t / prefill_s, 4)
        await release(channels, resp.handle)
        result["prompt"] = share
        return result
    finally:
        await channels.close()
        cluster.stop()


async def _wait_for_worker(channels: ChannelPool, address: str, cluster: Cluster) -> worker_pb2.StatsResponse:
    stub = worker_pb2_grpc.WorkerServiceStub(channels.get(address))
    deadline = time.monotonic() + 300
    while True:
        cluster.check_alive()
        try:
            return await stub.Stats(worker_pb2.StatsRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


def run_transfer_bench(model: str | None, sizes_mb: list[int], repeats: int, prompt_len: int) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as logs:
        res = asyncio.run(_run(model, sizes_mb, repeats, prompt_len, logs))
    top = res["sizes"][str(max(sizes_mb))]
    summary = {
        "mb": max(sizes_mb),
        "copy_gbps": top["copy_gbps"],
        "grpc_gbps": top["grpc_gbps"],
        "nixl_gbps": top.get("nixl_gbps"),
    }
    summary["grpc_over_copy"] = round(top["grpc_gbps"] / top["copy_gbps"], 3)
    if top.get("nixl_gbps"):
        summary["nixl_over_copy"] = round(top["nixl_gbps"] / top["copy_gbps"], 3)
    summary["detail"] = res
    return summary
