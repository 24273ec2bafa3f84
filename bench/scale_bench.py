"""`kvrelay bench scale`: the gateway's control plane against many simulated workers.

For each pool size, in this process and with no real worker:
- the registry holds N workers (half prefill, half decode) with generated Stats, and the prefix
  index a view of each one's cache (`blocks_per_worker` block hashes drawn from shared prompts);
- decision latency: `Orchestrator.route` (the gateway's own path: block hashes of the prompt,
  candidates from every worker, filters, scorers, prefix match, P/D decider, pick), over prompts
  that share system prefixes the way chat traffic does;
- event ingest: KV event batches as they arrive from the workers' Redis streams (decoded, then
  applied to the prefix index), in events per second;
- discovery (with a redis-server on this machine): one poll of the registry as gateways do it
  (the index set, MGET, decode and verify every record), median of several.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from common.discovery.event_stream import decode_entry, encode_entry
from common.discovery.record import RegistryKeys, WorkerRecord
from common.kv.block_hash import block_hashes
from common.kv.events import KVEvent
from common.rpc import types_pb2, worker_pb2
from common.rpc.channels import ChannelPool
from common.rpc.tls import TLSSettings
from common.settings import GatewaySettings
from gateway.discovery import StaticDiscovery
from gateway.kv_events import KVEventWatcher
from gateway.orchestrator import Orchestrator
from gateway.registry import WorkerRegistry, WorkerState
from gateway.scheduling.config import load_config
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.scheduler import Scheduler

MODEL = "bench-model"
BLOCK = 16
_TOTAL_BLOCKS = 4096


def _layout() -> types_pb2.KVLayout:
    return types_pb2.KVLayout(model_id=MODEL, block_size=BLOCK, num_layers=30, num_kv_heads=3, head_dim=64)


def _prompts(rng: random.Random, n: int, systems: int = 64, prompt_tokens: int = 512) -> list[list[int]]:
    """Chat-like prompts: one of `systems` shared system prompts (3/4 of the length), then the user's own."""
    heads = [[rng.randrange(49152) for _ in range(prompt_tokens * 3 // 4)] for _ in range(systems)]
    return [rng.choice(heads) + [rng.randrange(49152) for _ in range(prompt_tokens // 4)] for _ in range(n)]


def _registry(n_workers: int, rng: random.Random, prompts: list[list[int]], blocks_per_worker: int):
    """A registry of `n_workers` healthy workers with Stats, and a prefix index of their caches."""
    registry = WorkerRegistry(ChannelPool(TLSSettings()), StaticDiscovery([], []), model_id=MODEL)
    index = PrefixIndex()
    pool_hashes = [block_hashes(p, BLOCK) for p in prompts[:256]]
    for i in range(n_workers):
        role = "prefill" if i % 2 == 0 else "decode"
        worker_id = f"{role}-{i}"
        free = rng.randrange(_TOTAL_BLOCKS // 4, _TOTAL_BLOCKS)
        stats = worker_pb2.StatsResponse(
            worker_id=worker_id,
            role=role,
            model_id=MODEL,
            layout=_layout(),
            waiting=rng.randrange(4),
            running=rng.randrange(32),
            free_blocks=free,
            total_blocks=_TOTAL_BLOCKS,
        )
        address = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}:50051"
        registry.workers[(role, address)] = WorkerState(address, role, healthy=True, stats=stats, last_seen=time.time())
        cached: set[int] = set()
        while len(cached) < blocks_per_worker:
            cached.update(rng.choice(pool_hashes))
        index.snapshot(worker_id, cached, last_seq=0)
    registry.refresh_views()  # what each poll does
    return registry, index


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _time_calls(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure_decisions(n_workers: int, decisions: int, blocks_per_worker: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    prompts = _prompts(rng, max(decisions, 256))
    registry, index = _registry(n_workers, rng, prompts, blocks_per_worker)
    orch = Orchestrator(registry, registry.channels, GatewaySettings(), Scheduler(load_config(None), index, rng))
    it = iter(prompts * 2)
    for _ in range(20):  # warm up
        orch.route(next(it))
    times = _time_calls(lambda: orch.route(next(it)), decisions)
    return {
        "decision_p50_ms": round(statistics.median(times) * 1e3, 4),
        "decision_p99_ms": round(_percentile(times, 0.99) * 1e3, 4),
    }


def measure_events(n_workers: int, batches_per_worker: int, batch: int = 16, seed: int = 0) -> float:
    """Events/s through the gateway's ingest path (stream entry → events → prefix index)."""
    rng = random.Random(seed)
    index = PrefixIndex()
    watcher = KVEventWatcher(ChannelPool(TLSSettings()), index)
    entries = []
    for w in range(n_workers):
        worker_id = f"w{w}"
        index.snapshot(worker_id, [], last_seq=0)
        seq = 1
        for _ in range(batches_per_worker):
            events = [
                KVEvent(seq + k, "stored" if rng.random() < 0.6 else "removed", rng.getrandbits(64))
                for k in range(batch)
            ]
            seq += batch
            entries.append((worker_id, encode_entry(events)))
    rng.shuffle(entries)  # interleaved across workers as several streams are read; in order per worker
    entries.sort(key=lambda e: int(e[1][b"first"]))
    t0 = time.perf_counter()
    for worker_id, fields in entries:
        if not watcher.apply(worker_id, decode_entry(fields)):
            raise RuntimeError("event gap in a generated stream")
    elapsed = time.perf_counter() - t0
    return len(entries) * batch / elapsed


async def _discovery_poll_ms(redis_url: str, n_workers: int, polls: int) -> float:
    from common.discovery.redis_client import open_redis
    from gateway.discovery import RedisDiscovery

    keys = RegistryKeys(f"scale{n_workers}")
    client = open_redis(redis_url)
    secret = b"s" * 32
    async with client.pipeline(transaction=False) as pipe:
        for i in range(n_workers):
            rec = WorkerRecord(
                worker_id=f"w{i}",
                role="decode" if i % 2 else "prefill",
                address=f"10.0.{i // 256}.{i % 256}:50051",
                model_id=MODEL,
                layout={"block_size": BLOCK},
                total_blocks=_TOTAL_BLOCKS,
                max_model_len=8192,
                transfer_backends=["grpc"],
                incarnation="x",
                started_at=0.0,
            ).signed(secret)
            pipe.set(keys.worker(rec.worker_id), rec.encode(), ex=300)
            pipe.sadd(keys.index, rec.worker_id)
        await pipe.execute()
    disc = RedisDiscovery(client, keys, [], [], secret)
    times = []
    for _ in range(polls):
        t0 = time.perf_counter()
        found = await disc.members()
        times.append(time.perf_counter() - t0)
        if len(found) != n_workers:
            raise RuntimeError(f"discovery found {len(found)} of {n_workers} workers")
    await disc.close()
    return round(statistics.median(times) * 1e3, 3)


def run_scale_bench(sizes: list[int], decisions: int = 2000, blocks_per_worker: int = 2000, redis: bool = True) -> dict:
    from kvrelay.redis_server import redis_server

    result: dict = {"workers": {}}
    have_redis = redis and shutil.which("redis-server") is not None
    with tempfile.TemporaryDirectory() as tmp, redis_server(tmp) if have_redis else contextlib.nullcontext() as url:
        for n in sizes:
            row = measure_decisions(n, decisions, blocks_per_worker)
            row["events_per_s"] = round(measure_events(n, batches_per_worker=max(2, 20_000 // n)))
            if url:
                row["discovery_poll_ms"] = asyncio.run(_discovery_poll_ms(url, n, polls=20))
            result["workers"][str(n)] = row
    result["targets"] = {"decision_p99_ms": {"100": 1.0, "1000": 5.0}}
    result["discovery"] = "index set + MGET (no SCAN)" if have_redis else "not measured: no redis-server"
    return result
