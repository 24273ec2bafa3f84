"""`kvrelay bench prefix`: does routing find the cache? A shared-prefix workload — a few long
system prompts with Zipf-skewed popularity, short user turns, Poisson arrivals — replayed once per
policy against a fresh cluster (caches start cold every time) of 2+ prefill and 1+ decode workers.

hit_rate: prompt tokens the chosen prefill worker found cached / prompt tokens (from usage).
oracle_hit_rate: the same if every system prompt were computed exactly once, anywhere.
share_max_min: most / fewest requests any prefill worker served.
The P/D decider is disabled for every policy, so all prompts go through a prefill worker and only
the routing differs.

Each prefill worker's KV cache holds fewer system prompts than the workload has (by default about 5
of 8 with SmolLM2: 240 MB at 46 KB per token), as in production, where the working set outgrows
one worker's cache. Routing that spreads every prefix over every worker then evicts what it will
need again; routing that shards prefixes keeps them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from collections import Counter

import httpx
from rich.progress import Progress

from bench.loadgen import percentile
from kvrelay.launcher import Cluster, free_port


def _policy_yaml(policy: str, log_dir: str) -> str:
    from bench.policies import POLICIES

    cfg = {**POLICIES[policy], "decider": {"enabled": False}}
    path = os.path.join(log_dir, f"{policy}.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return path


def plan(n: int, prefixes: int, prefix_len: int, vocab: int, zipf_s: float, seed: int) -> tuple[list, float]:
    rng = random.Random(seed)
    systems = [[rng.randrange(100, vocab) for _ in range(prefix_len)] for _ in range(prefixes)]
    weights = [1 / (k + 1) ** zipf_s for k in range(prefixes)]
    requests, seen, cacheable, total = [], set(), 0, 0
    for _ in range(n):
        k = rng.choices(range(prefixes), weights=weights)[0]
        user = [rng.randrange(100, vocab) for _ in range(rng.randint(8, 40))]
        prompt = systems[k] + user
        requests.append((k, prompt))
        total += len(prompt)
        if k in seen:
            cacheable += (prefix_len // 16) * 16  # full blocks of the shared system prompt
        seen.add(k)
    return requests, cacheable / total


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int]) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, usage, worker = None, None, ""
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {
                "ttft": None,
                "usage": None,
                "worker": "",
                "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}",
            }
        worker = r.headers.get("x-kvrelay-prefill", "")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if ttft is None and data.get("choices"):
                ttft = time.perf_counter() - t0
            if "error" in data:
                return {"ttft": None, "usage": None, "worker": worker, "error": data["error"]["message"]}
            if data.get("usage"):
                usage = data["usage"]
    return {"ttft": ttft, "usage": usage, "worker": worker, "error": None}


async def _replay(url: str, requests: list, rate: float, seed: int, label: str) -> list[dict]:
    rng = random.Random(seed + 7)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        tasks = []
        with Progress(transient=True) as bar:
            task = bar.add_task(label, total=len(requests))
            for _, prompt in requests:
                t = asyncio.create_task(_one(client, url, model, prompt))
                t.add_done_callback(lambda _: bar.advance(task))
                tasks.append(t)
                await asyncio.sleep(rng.expovariate(rate))
            return list(await asyncio.gather(*tasks))


def run_prefix_bench(
    model: str | None,
    prefill: int,
    decode: int,
    policies: list[str],
    n: int,
    rate: float,
    prefixes: int,
    prefix_len: int,
    seed: int,
    kv_cache_mb: int | None = None,
) -> dict:
    vocab = 49152 if model is None else 256
    requests, oracle = plan(n, prefixes, prefix_len, vocab, 1.1, seed)
    out: dict = {"oracle_hit_rate": round(oracle, 4), "policies": {}}
    with tempfile.TemporaryDirectory() as logs:
        for policy in policies:
            cluster = Cluster(log_dir=logs, env={"KVRELAY_ROUTING_HEADERS": "true"})
            try:
                cache = ["--kv-cache-mb", str(kv_cache_mb)] if kv_cache_mb else []
                p = [cluster.worker("prefill", free_port(), 1, model, cache) for _ in range(prefill)]
                d = [cluster.worker("decode", free_port(), 1, model) for _ in range(decode)]
                url = cluster.gateway(free_port(), p, d, model, ["--scheduler-config", _policy_yaml(policy, logs)])
                cluster.wait_ready(url, timeout=300, want_mode="disaggregated")
                time.sleep(2.0)  # let the gateway's KV event streams attach
                results = asyncio.run(_replay(url, requests, rate, seed, policy))
            finally:
                cluster.stop()
            ok = [r for r in results if r["usage"] and r["ttft"] is not None]
            prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in ok)
            cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in ok)
            counts = Counter(r["worker"] for r in ok)
            per_worker = [counts.get(a, 0) for a in p]
            ttfts = [r["ttft"] for r in ok]
            out["policies"][policy] = {
                "requests": len(results),
                "failed": len(results) - len(ok),
                "errors": sorted({r["error"] for r in results if r.get("error")})[:3],
                "hit_rate": round(cached / max(1, prompt_tokens), 4),
                "ttft_mean_s": round(sum(ttfts) / max(1, len(ttfts)), 4),
                "ttft_p50_s": round(percentile(ttfts, 0.5), 4),
                "ttft_p99_s": round(percentile(ttfts, 0.99), 4),
                "share_max_min": round(max(per_worker) / max(1, min(per_worker)), 3),
                "per_worker": per_worker,
            }
    pol = out["policies"]
    if "prefix_load" in pol:
        out["prefix_load_over_oracle"] = round(pol["prefix_load"]["hit_rate"] / max(1e-9, oracle), 3)
        if "round_robin" in pol:
            out["ttft_mean_prefix_over_rr"] = round(
                pol["prefix_load"]["ttft_mean_s"] / max(1e-9, pol["round_robin"]["ttft_mean_s"]), 3
            )
    out["workload"] = {
        "requests": n,
        "rate_rps": rate,
        "prefixes": prefixes,
        "prefix_tokens": prefix_len,
        "zipf_s": 1.1,
        "prefill_workers": prefill,
        "prefill_kv_cache_mb": kv_cache_mb,
        "decode_workers": decode,
        "seed": seed,
    }
    return out
