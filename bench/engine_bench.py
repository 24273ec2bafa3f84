"""`kvrelay bench engine`: the engine alone on the real model, for each weight format, against the
machine's limits.

Each format runs in a process of its own (so each peak RSS is its own): decode tokens/s at each
concurrency, prefill tokens/s, peak RSS, the weight bytes a decode step reads. The machine's
memory bandwidth is measured here (a large tensor read); a batch-1 decode step must read every
weight once, so `bandwidth / bytes per step` bounds single-stream decode, and each format's batch-1
rate is also reported as a fraction of its bound, and of the rate its matmul kernels alone allow
(a step that did nothing but its matrix products). A separate process measures each format's top-1
agreement and KL divergence against transformers' fp32 logits on real text. The top-level keys
describe the default format (what `auto` picks), as before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from rich.progress import Progress

from bench.engine_rates import TOPICS
from common.config import EngineConfig
from common.engine.factory import resolve_quantization
from common.model_source import resolve_model
from common.tokenizer import Tokenizer


def _child(module: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hf_rate(model: str | None, new_tokens: int, threads: int) -> float:
    """transformers `generate` on the same file, single stream, the same prompt as concurrency 1."""
    src = resolve_model(model)
    tokenizer = Tokenizer.from_source(src)
    prompt = tokenizer.encode_chat([{"role": "user", "content": f"Write story 0 about {TOPICS[0]}."}])
    args = {"dir": str(src.path.parent), "file": src.path.name, "prompt_ids": prompt}
    return _child("bench.hf_baseline", {**args, "new_tokens": new_tokens, "threads": threads})["hf_decode_tok_s"]


def memory_bandwidth_gbps(threads: int, mb: int = 1024, repeats: int = 5) -> float:
    """Best of `repeats` full reads of an `mb` MiB fp32 tensor (a sum: one pass, no writes)."""
    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def run_engine_bench(
    model: str | None,
    concurrency: list[int],
    new_tokens: int,
    prefill_len: int,
    threads: int | None,
    hf: bool,
    modes: list[str] | None = None,
    quality: bool = True,
    quality_positions: int = 2048,
) -> dict:
    threads = threads or os.cpu_count() or 1
    modes = modes or ["none", "fp16", "int8"]
    default = resolve_quantization(EngineConfig(model=model), resolve_model(model))
    common = {"model": model, "threads": threads, "concurrency": concurrency}
    common |= {"new_tokens": new_tokens, "prefill_len": prefill_len}
    result: dict = {"model": resolve_model(model).model_id, "cores": os.cpu_count(), "threads": threads}
    with Progress(transient=True) as bar:
        task = bar.add_task("engine bench", total=len(modes) + 1 + int(quality) + int(hf))
        result["bandwidth_gbps"] = round(memory_bandwidth_gbps(threads), 2)
        bar.advance(task)
        per_mode = {}
        for mode in modes:
            bar.update(task, description=f"engine bench: {mode}")
            per_mode[mode] = _child("bench.engine_mode", {**common, "mode": mode})
            bar.advance(task)
        if quality:
            bar.update(task, description="engine bench: quality against transformers fp32")
            q = _child(
                "bench.engine_quality",
                {"model": model, "threads": threads, "modes": modes, "positions": quality_positions},
            )
            for mode in modes:
                per_mode[mode]["quality"] = q[mode]
            bar.advance(task)
        if hf:
            result["hf_decode_tok_s"] = round(_hf_rate(model, new_tokens, threads), 2)
            bar.advance(task)
    limits = {}
    for mode, figures in per_mode.items():
        limits[mode] = round(result["bandwidth_gbps"] * 1e9 / (figures["weight_mb_per_token"] * 2**20), 1)
        if "1" in figures["decode_tok_s"]:
            figures["decode_1_of_limit"] = round(figures["decode_tok_s"]["1"] / limits[mode], 3)
    result["default_mode"] = default
    result["modes"] = per_mode
    result["limit_tok_s"] = limits
    if default in per_mode:  # today's top-level keys, for the default format
        d = per_mode[default]
        result |= {k: d[k] for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_mb")}
        max_c = str(max(concurrency))
        if "1" in d["decode_tok_s"] and max_c in d["decode_tok_s"]:
            result[f"decode_scaling_{max_c}_over_1"] = round(d["decode_tok_s"][max_c] / d["decode_tok_s"]["1"], 2)
        if hf and "1" in d["decode_tok_s"]:
            result["decode_1_over_hf"] = round(d["decode_tok_s"]["1"] / result["hf_decode_tok_s"], 3)
    return result
