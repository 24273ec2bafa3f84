"""`kvrelay bench serve --streams 8,32`: output tokens/s of the whole disaggregated stack (gateway,
1 prefill + 1 decode worker) under closed-loop load, for each weight format side by side.

Each stream is a client that sends its next request as soon as the last one ends (chat-sized
prompts, a fixed number of output tokens, ignore_eos), so the decode batch holds about as many
sequences as there are streams. Formats run in the order A B B A (for two) so that drift of a
shared machine falls on both; each format's two runs are pooled. The gateway's admission queue is
raised to the stream count: this measures throughput, not load shedding.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

import httpx
from rich.console import Console
from rich.progress import Progress

from bench.loadgen import Mix, Sample, percentile, plan_requests, send_completion
from bench.serve_bench import start_cluster

STREAM_MIX = (Mix("chat", 1.0, (20, 120), (64, 64)),)


async def _closed_loop(
    url: str, model: str, streams: int, per_stream: int, vocab: int, seed: int, label: str
) -> tuple[list[Sample], float]:
    # distinct prompts per stream and per stream count (no prefix-cache hits between runs of one cluster)
    plans = [plan_requests(per_stream, STREAM_MIX, vocab, seed * 100_000 + streams * 1000 + i) for i in range(streams)]
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        with Progress(transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task(f"{label}: {streams} streams", total=streams * per_stream)

            async def stream(plan: list[tuple[str, list[int], int]]) -> list[Sample]:
                out = []
                for kind, prompt, olen in plan:
                    out.append(await send_completion(client, url, model, kind, prompt, olen))
                    bar.advance(task)
                return out

            t0 = time.perf_counter()
            per = await asyncio.gather(*(stream(p) for p in plans))
            return [s for samples in per for s in samples], time.perf_counter() - t0


def _figures(samples: list[Sample], seconds: float) -> dict:
    ok = [s for s in samples if not s.error and s.tokens]
    tpot = [t for s in ok if (t := s.tpot) is not None]
    return {
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "output_tokens": sum(s.tokens for s in ok),
        "seconds": round(seconds, 2),
        "output_tok_s": round(sum(s.tokens for s in ok) / seconds, 2),
        "ttft_p50_s": round(percentile([s.ttft for s in ok], 0.5), 4) if ok else None,
        "tpot_p50_s": round(percentile(tpot, 0.5), 4) if tpot else None,
        "tpot_p99_s": round(percentile(tpot, 0.99), 4) if tpot else None,
    }


def run_streams_bench(model: str | None, streams: list[int], formats: list[str], per_stream: int, seed: int) -> dict:
    order = formats if len(formats) != 2 else [formats[0], formats[1], formats[1], formats[0]]
    pooled: dict[str, dict[int, tuple[list[Sample], float]]] = {f: {} for f in formats}
    with tempfile.TemporaryDirectory() as logs:
        for i, fmt in enumerate(order):
            env = {"KVRELAY_ENGINE__QUANTIZATION": fmt, "KVRELAY_ADMISSION__MAX_WAITING_PER_WORKER": str(max(streams))}
            log_dir = os.path.join(logs, f"{fmt}-{i}")
            os.makedirs(log_dir)
            cluster, url = start_cluster("disaggregated", model, log_dir, env)
            try:
                info = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
                vocab = 49152 if "smollm2" in info["id"].lower() else 256
                asyncio.run(_closed_loop(url, info["id"], 2, 1, vocab, seed + 1, f"{fmt} warm-up"))
                for s in streams:
                    samples, secs = asyncio.run(_closed_loop(url, info["id"], s, per_stream, vocab, seed, fmt))
                    prev = pooled[fmt].get(s, ([], 0.0))
                    pooled[fmt][s] = (prev[0] + samples, prev[1] + secs)
            finally:
                cluster.stop()
    result: dict = {
        "formats": {f: {str(s): _figures(*pooled[f][s]) for s in streams} for f in formats},
        "order": order,
        "workload": {"streams": streams, "requests_per_stream": per_stream, "mix": [m.__dict__ for m in STREAM_MIX]},
    }
    if len(formats) == 2:
        a, b = (result["formats"][f] for f in formats)
        result["ratios"] = {
            f"{formats[1]}_over_{formats[0]}_{s}": round(b[str(s)]["output_tok_s"] / a[str(s)]["output_tok_s"], 3)
            for s in streams
            if a[str(s)]["output_tok_s"]
        }
    return result
