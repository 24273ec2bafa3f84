"""`kvrelay bench serve`: latency and throughput of the served system under Poisson load.

Against --url, or against clusters it starts: disaggregated (1 prefill + 1 decode worker, the cores
split between them) and, with --compare colocated, one worker that prefills and decodes with all the
cores; with --compare tracing, the disaggregated cluster tracing every request (100% sampling, span
files) and with tracing off, in the order traced, untraced, untraced, traced so that drift of a
shared machine falls on both alike; each condition's two runs are pooled. Same workload, same seed,
one after the other in the same run.

With --rates, one disaggregated cluster (or --url) is driven at each arrival rate in turn, lowest
first: the lowest is the unloaded baseline, the others are meant to be well past capacity. Open-loop
arrivals keep coming whatever the server does, so past capacity a gateway either sheds load with 429
or lets queues, and the latency of what it admitted, grow. Per rate: accepted, 429 share, TTFT and
TPOT of admitted requests, and each TPOT p99 over the unloaded one (target <= 1.5: admission should
protect the requests it lets in). Each rate gets its own prompts (seed + i), so no run finds the
previous run's prompts in the prefix cache.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import httpx

from bench.loadgen import DEFAULT_MIX, plan_requests, run_load, summarize
from common.tracing.jsonl import read_spans
from kvrelay.launcher import Cluster, divide_cores, free_port

# run label -> (cluster mode, environment of its processes)
_RUNS = {
    "disaggregated": ("disaggregated", {}),
    "colocated": ("colocated", {}),
    "traced": ("disaggregated", {"KVRELAY_TRACING__ENABLED": "true", "KVRELAY_TRACING__SAMPLE_RATIO": "1.0"}),
    "untraced": ("disaggregated", {"KVRELAY_TRACING__ENABLED": "false"}),
    "secured": ("disaggregated", {}),  # its keys, limits and certificates are made per run (_secured)
    "open": ("disaggregated", {"KVRELAY_AUTH__ENABLED": "false"}),
}
_COMPARE = {
    None: ["disaggregated"],
    "colocated": ["disaggregated", "colocated"],
    "tracing": ["traced", "untraced", "untraced#2", "traced#2"],  # ABBA
    "auth": ["secured", "open", "open#2", "secured#2"],  # ABBA
}
# secured: API keys with rate limits (high enough never to refuse) and mutual TLS between services
_SECURED_KEY_LIMITS = {"rpm": 100_000, "tpm": 10**9}


def _secured(log_dir: str) -> tuple[dict[str, str], dict[str, str]]:
    """(process environment, client headers) of a cluster with API keys, rate limits and mTLS."""
    from bench.tls_ca import TestCA
    from gateway.api_keys import KeyStore

    ca = TestCA(Path(log_dir) / "pki")
    cert, key = ca.issue("kvrelay-bench")
    keys_file = os.path.join(log_dir, "keys.json")
    api_key, _ = KeyStore(keys_file).add("bench", **_SECURED_KEY_LIMITS)
    env = {
        "KVRELAY_AUTH__ENABLED": "true",
        "KVRELAY_AUTH__KEYS_FILE": keys_file,
        "KVRELAY_TLS__CA_FILE": str(ca.ca_file),
        "KVRELAY_TLS__CERT_FILE": str(cert),
        "KVRELAY_TLS__KEY_FILE": str(key),
    }
    return env, {"Authorization": f"Bearer {api_key}"}


def start_cluster(mode: str, model: str | None, log_dir: str, env: dict[str, str]) -> tuple[Cluster, str]:
    """A cluster of the bench's shape (disaggregated: 1 prefill + 1 decode worker, the cores split
    between them; colocated: one worker with all of them) and its gateway URL, once ready."""
    cores = os.cpu_count() or 1
    env = {"KVRELAY_TRACING__DIR": os.path.join(log_dir, "traces"), **env}
    cluster = Cluster(log_dir=log_dir, env=env)
    try:
        if mode == "colocated":
            d = [cluster.worker("decode", free_port(), cores, model)]
            url = cluster.gateway(free_port(), [], d, model)
        else:
            plan = divide_cores(cores, 1, 1)
            p = [cluster.worker("prefill", free_port(), plan.prefill_threads, model)]
            d = [cluster.worker("decode", free_port(), plan.decode_threads, model)]
            url = cluster.gateway(free_port(), p, d, model)
        cluster.wait_ready(url, timeout=300, want_mode=mode)
    except BaseException:
        cluster.stop()
        raise
    return cluster, url


def _measure(
    url: str,
    label: str,
    n: int,
    rate: float,
    seed: int,
    slo_ttft: float,
    slo_tpot: float,
    warm_up: bool = True,
    headers: dict[str, str] | None = None,
) -> tuple[dict, list]:
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]
    vocab = 49152 if "SmolLM2" in models["id"] else 256
    requests = plan_requests(n, DEFAULT_MIX, vocab, seed, models.get("max_model_len"))
    if warm_up:
        warm = plan_requests(2, DEFAULT_MIX, vocab, seed + 99, models.get("max_model_len"))
        asyncio.run(run_load(url, models["id"], warm, 10.0, seed, f"{label} warm-up", headers))
    samples, makespan = asyncio.run(run_load(url, models["id"], requests, rate, seed, label, headers))
    return summarize(samples, makespan, slo_ttft, slo_tpot), samples


def run_serve_bench(
    url: str | None,
    model: str | None,
    compare: str | None,
    n: int,
    rate: float,
    seed: int,
    slo_ttft: float,
    slo_tpot: float,
    plot: str | None,
) -> dict:
    results: dict = {}
    all_samples: dict = {}
    if compare not in _COMPARE:
        raise ValueError(f"--compare must be one of colocated, tracing, auth; got {compare!r}")
    with tempfile.TemporaryDirectory() as logs:
        makespans: dict[str, float] = {}
        spans = 0
        for run in _COMPARE[compare]:
            label = run.split("#")[0]  # runs of one condition are pooled
            if url is not None and label == "disaggregated":
                results[label], all_samples[label] = _measure(url, label, n, rate, seed, slo_ttft, slo_tpot)
                continue
            mode, env = _RUNS[label]
            log_dir = os.path.join(logs, run.replace("#", "-"))
            os.makedirs(log_dir)
            headers = None
            if label == "secured":
                secured_env, headers = _secured(log_dir)
                env = {**env, **secured_env}
            cluster, run_url = start_cluster(mode, model, log_dir, env)
            try:
                summary, samples = _measure(run_url, run, n, rate, seed, slo_ttft, slo_tpot, headers=headers)
            finally:
                cluster.stop()
            all_samples[label] = all_samples.get(label, []) + samples
            makespans[label] = makespans.get(label, 0.0) + summary["makespan_s"]
            results.setdefault("runs", {})[run] = {
                k: summary[k] for k in ("ttft_p50_s", "ttft_p99_s", "throughput_tok_s")
            }
            if label == "traced":
                spans += sum(1 for _ in read_spans(os.path.join(log_dir, "traces")))
        for label, total in makespans.items():
            results[label] = summarize(all_samples[label], total, slo_ttft, slo_tpot)
        if spans:
            results["traced"]["spans_exported"] = spans
    if "colocated" in results:
        d, c = results["disaggregated"], results["colocated"]
        results["ratios"] = {
            "tpot_p99_disagg_over_coloc": _ratio(d["tpot_p99_s"], c["tpot_p99_s"]),
            "throughput_disagg_over_coloc": _ratio(d["throughput_tok_s"], c["throughput_tok_s"]),
            "ttft_p99_disagg_over_coloc": _ratio(d["ttft_p99_s"], c["ttft_p99_s"]),
        }
    for on, off in (("traced", "untraced"), ("secured", "open")):
        if on not in results:
            continue
        t, u = results[on], results[off]
        gain = _change(t["throughput_tok_s"], u["throughput_tok_s"])
        results["ratios"] = {
            "throughput_loss": None if gain is None else -gain,
            "ttft_p99_increase": _change(t["ttft_p99_s"], u["ttft_p99_s"]),
            "ttft_p50_increase": _change(t["ttft_p50_s"], u["ttft_p50_s"]),
            "ttft_p50_delta_ms": None
            if t["ttft_p50_s"] is None or u["ttft_p50_s"] is None
            else round((t["ttft_p50_s"] - u["ttft_p50_s"]) * 1000, 1),
            "tpot_p99_increase": _change(t["tpot_p99_s"], u["tpot_p99_s"]),
        }
    results["workload"] = {
        "requests": n,
        "rate_rps": rate,
        "seed": seed,
        "slo_ttft_s": slo_ttft,
        "slo_tpot_s": slo_tpot,
        "cores": os.cpu_count(),
        "mix": [m.__dict__ for m in DEFAULT_MIX],
    }
    if plot:
        _plot(all_samples, plot)
        results["plot"] = plot
    return results


_RATE_KEYS = (
    "requests",
    "accepted",
    "rejected_429",
    "share_429",
    "failed",
    "errors",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "throughput_tok_s",
    "goodput_rps",
    "makespan_s",
)
TPOT_P99_RATIO_TARGET = 1.5


def run_rates_bench(
    url: str | None,
    model: str | None,
    rates: list[float],
    n: int,
    seed: int,
    slo_ttft: float,
    slo_tpot: float,
    plot: str | None,
) -> dict:
    """One cluster, one run per arrival rate (lowest first, the unloaded baseline), side by side."""
    rates = sorted(rates)
    per_rate: list[dict] = []
    all_samples: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as logs:
        cluster, run_url = (None, url) if url else start_cluster("disaggregated", model, logs, {})
        try:
            for i, rate in enumerate(rates):
                label = f"{rate:g}/s"
                summary, samples = _measure(run_url, label, n, rate, seed + i, slo_ttft, slo_tpot, warm_up=i == 0)
                per_rate.append({"rate_rps": rate, **{k: summary[k] for k in _RATE_KEYS}})
                all_samples[label] = samples
        finally:
            if cluster is not None:
                cluster.stop()
    base = per_rate[0]["tpot_p99_s"]
    for r in per_rate[1:]:
        r["tpot_p99_over_unloaded"] = _ratio(r["tpot_p99_s"], base)
    ratios = [r["tpot_p99_over_unloaded"] for r in per_rate[1:]]
    results: dict = {
        "rates": per_rate,
        "unloaded_rate_rps": rates[0],
        "target": {
            "tpot_p99_over_unloaded_max": TPOT_P99_RATIO_TARGET,
            # unmeasurable (nothing admitted completed) counts as not met
            "met": bool(ratios) and all(q is not None and q <= TPOT_P99_RATIO_TARGET for q in ratios),
        },
        "workload": {
            "requests_per_rate": n,
            "seed": seed,
            "cores": os.cpu_count(),
            "mix": [m.__dict__ for m in DEFAULT_MIX],
        },
    }
    if plot:
        _plot(all_samples, plot)
        results["plot"] = plot
    return results


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b, or None where either side measured nothing (every request failed or was rejected)."""
    return None if a is None or not b else round(a / b, digits)


def _change(a: float | None, b: float | None) -> float | None:
    """Relative change a / b - 1, None where a side is missing."""
    q = _ratio(a, b, 6)
    return None if q is None else round(q - 1, 4)


def _plot(samples: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode, ss in samples.items():
        ok = [s for s in ss if not s.error and s.tokens]
        for ax, values, title in (
            (axes[0], [s.ttft for s in ok], "TTFT (s)"),
            (axes[1], [t for s in ok if (t := s.tpot) is not None], "TPOT (s)"),
            (axes[2], [i for s in ok for i in s.itls], "inter-token latency (s)"),
        ):
            v = sorted(values)
            ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=mode)
            ax.set_xlabel(title)
            ax.set_ylabel("CDF")
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle("kvrelay bench serve: latency distributions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
