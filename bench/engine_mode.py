"""One weight format's engine figures, in a process of its own so that its peak RSS is its own:
decode tokens/s per concurrency, prefill tokens/s, peak RSS (and RSS once loaded, and the most KV
the runs held, which make up most of the peak at high concurrency) and the weight bytes one decode
step reads. Run by `kvrelay bench engine`; prints one JSON object."""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from torch import nn

from bench.engine_rates import decode_rate, prefill_rate
from common.config import EngineConfig
from common.engine.factory import build_engine
from common.model.llama import Linear
from common.model.quant import PackedLinear

_BYTES = {"fp16": 2, "int8": 1}


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of the matrices one decode step multiplies with (every projection and the output head,
    nominal: the packed formats' padding and scales aside); embedding lookups read a row, not counted."""
    total = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            total += m.in_features * m.out_features * _BYTES[m.fmt]
        elif isinstance(m, Linear | nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    if model.lm_head is None:  # tied, unpacked: the head is the embedding matrix
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


@torch.inference_mode()
def matmul_rate(model: nn.Module, repeats: int = 5) -> float:
    """Tokens/s of a batch-1 decode step that did nothing but its matrix products: every projection
    of every layer once, in order, and the output head (best of `repeats`). The weights stream from
    memory as in a real step, through the same kernels, so this is the rate the matmul kernels allow;
    the engine's batch-1 rate over it is the share of a step the rest (norms, RoPE, attention, cache
    writes, Python) leaves to the matrices."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear | Linear | nn.Linear)]
    inputs = [torch.randn(1, m.in_features if isinstance(m, PackedLinear) else m.weight.shape[0]) for m in layers]
    hidden = torch.randn(1, model.config.hidden_size)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the kernels
        t0 = time.perf_counter()
        for m, x in zip(layers, inputs, strict=True):
            m(x)
        model.logits(hidden)
        best = min(best, time.perf_counter() - t0)
    return 1.0 / best


def peak_rss_kb() -> int:
    """This process's peak RSS since its exec (VmHWM; getrusage's maxrss can carry the parent's over)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def run(args: dict) -> dict:
    engine = build_engine(
        EngineConfig(
            model=args["model"],
            threads=args["threads"],
            quantization=args["mode"],
            max_num_seqs=max(64, *args["concurrency"]),
        ),
        progress=False,
    )
    decode_rate(engine, 2, 8, "warmup")
    loaded_kb = current_rss_kb()  # weights and runtime; the KV cache is resident only as used
    decode, peak_blocks = {}, 0
    for c in args["concurrency"]:
        rate, blocks = decode_rate(engine, c, args["new_tokens"], f"c{c}")
        decode[str(c)], peak_blocks = round(rate, 2), max(peak_blocks, blocks)
    prefill = round(prefill_rate(engine, args["prefill_len"], 4), 1)
    matmuls = matmul_rate(engine.runner.model)
    if engine.blocks.leaks():
        raise RuntimeError(f"KV blocks leaked during the benchmark: {engine.blocks.leaks()}")
    return {
        "decode_tok_s": decode,
        "prefill_tok_s": prefill,
        "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
        "loaded_rss_mb": round(loaded_kb / 1024, 1),
        "peak_kv_mb": round(peak_blocks * engine.layout.block_bytes / 2**20, 1),
        "weight_mb_per_token": round(weight_bytes_per_token(engine.runner.model) / 2**20, 1),
        "matmul_only_tok_s": round(matmuls, 1),
        "decode_1_of_matmul_only": round(decode["1"] / matmuls, 3) if "1" in decode else None,
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
