"""`kvrelay bench models`: two models behind one gateway under a mixed workload, on workers whose
memory budget holds one model at a time, then both.

The models are the SmolLM2 GGUF served fp16 (the built-in) and the same file stored in the repository
under a second id, served int8: two real models of different sizes. With a budget of one, every switch
of model on a worker waits for the other model's requests to finish, evicts it and loads the next from
the repository; with a budget of both, nothing is loaded after start. Reported per budget: load and
eviction counts (all workers), the mean cold-load time, and TTFT p50/p99 per model.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile

from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import percentile, run_load
from common.model_source import default_model_path
from common.repository.store import ROOT_ENV, ModelRepository
from kvrelay.launcher import Cluster, divide_cores, free_port

BUILTIN = "smollm2-135m-instruct"
SECOND = "smollm2-int8"
_MB = 2**20


def _repository(root: str) -> list[str]:
    repo = ModelRepository(root)
    repo.ensure_builtin()
    repo.add(default_model_path(), SECOND, version="1", progress=False, serve_quantization="int8")
    return [BUILTIN, SECOND]


def _workload(n: int, models: list[str], seed: int) -> list[tuple[str, list[int], int]]:
    """Chat-like requests, each for one of the models at random (kind = the model)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(100, 49152) for _ in range(rng.randint(40, 160))]
        out.append((rng.choice(models), prompt, rng.randint(16, 32)))
    return out


def _worker_metrics(address: str) -> dict[tuple[str, tuple], float]:
    import httpx

    host, port = address.rsplit(":", 1)
    text = httpx.get(f"http://{host}:{int(port) + 1000}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(metrics: list[dict], name: str, model: str) -> float:
    return sum(v for m in metrics for (n, labels), v in m.items() if n == name and ("model", model) in labels)


def _run_budget(
    label: str, budget_mb: int, kv_cache_mb: int, models: list[str], n: int, rate: float, seed: int, env: dict
) -> dict:
    with tempfile.TemporaryDirectory() as logs:
        plan = divide_cores(os.cpu_count() or 1, 1, 1)
        cluster = Cluster(log_dir=logs, env=env)
        worker = ["--models", ",".join(models), "--kv-cache-mb", str(kv_cache_mb), "--memory-budget-mb", str(budget_mb)]
        try:
            p = [cluster.worker("prefill", free_port(), plan.prefill_threads, None, worker)]
            d = [cluster.worker("decode", free_port(), plan.decode_threads, None, worker)]
            url = cluster.gateway(free_port(), p, d, None, ["--models", ",".join(models)])
            cluster.wait_ready(url, timeout=300, want_mode="disaggregated")
            before = [_worker_metrics(a) for a in p + d]
            samples, makespan = asyncio.run(
                run_load(url, "", _workload(n, models, seed), rate, seed, f"budget {label}", kind_is_model=True)
            )
            after = [_worker_metrics(a) for a in p + d]
        finally:
            cluster.stop()
    result: dict = {"budget_mb": budget_mb, "makespan_s": round(makespan, 2), "per_model": {}}
    for model in models:
        mine = [s for s in samples if s.kind == model]
        ok = [s for s in mine if not s.error and s.tokens]
        loads = _sum(after, "kvrelay_worker_model_loads_total", model) - _sum(
            before, "kvrelay_worker_model_loads_total", model
        )
        load_s = _sum(after, "kvrelay_worker_model_load_seconds_sum", model)
        load_n = _sum(after, "kvrelay_worker_model_load_seconds_count", model)
        result["per_model"][model] = {
            "requests": len(mine),
            "failed": len(mine) - len(ok),
            "ttft_p50_s": _r(percentile([s.ttft for s in ok], 0.5)),
            "ttft_p99_s": _r(percentile([s.ttft for s in ok], 0.99)),
            "loads_during_run": int(loads),
            "evictions": int(_sum(after, "kvrelay_worker_model_evictions_total", model)),
            "cold_load_mean_s": _r(load_s / load_n) if load_n else None,
            "footprint_mb": _r(max(_sum([m], "kvrelay_worker_model_bytes", model) for m in after) / _MB),
        }
    result["loads"] = sum(m["loads_during_run"] for m in result["per_model"].values())
    result["evictions"] = sum(m["evictions"] for m in result["per_model"].values())
    return result


def _r(x: float | None) -> float | None:
    return None if x is None or x != x else round(x, 3)


def run_models_bench(n: int, rate: float, seed: int, kv_cache_mb: int, budgets: dict[str, int]) -> dict:
    with tempfile.TemporaryDirectory() as root:
        models = _repository(root)
        env = {ROOT_ENV: root}
        runs = {label: _run_budget(label, mb, kv_cache_mb, models, n, rate, seed, env) for label, mb in budgets.items()}
    one, both = runs.get("one"), runs.get("both")
    summary = {
        "models": models,
        "requests_per_run": n,
        "rate_rps": rate,
        "budgets": runs,
    }
    if one and both:
        for model in models:
            a, b = one["per_model"][model], both["per_model"][model]
            summary.setdefault("ttft_p50_ratio_one_vs_both", {})[model] = (
                _r(a["ttft_p50_s"] / b["ttft_p50_s"]) if a["ttft_p50_s"] and b["ttft_p50_s"] else None
            )
    return summary
