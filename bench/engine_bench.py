"""`kvrelay bench engine`: the engine alone, in-process, on the real model.

decode_tok_s[c]: c requests with short chat prompts generate `new_tokens` each; the rate counts
tokens after the first and the time after every request has its first token (the decode phase).
prefill_tok_s: distinct `prefill_len`-token prompts, one at a time, max_tokens=1, no cache hits.
hf_decode_tok_s: transformers generate, single stream, same weights, same decode-phase definition.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time

from rich.progress import Progress

from common.config import EngineConfig
from common.engine.factory import build_engine
from common.engine.llm_engine import LLMEngine
from common.engine.sampling import SamplingParams
from common.model_source import resolve_model

TOPICS = ["the sea", "a robot", "mountains", "a city at night", "bread", "a comet", "rain", "chess"]


def _chat(engine: LLMEngine, i: int) -> list[int]:
    topic = TOPICS[i % len(TOPICS)]
    return engine.tokenizer.encode_chat([{"role": "user", "content": f"Write story {i} about {topic}."}])


def _decode_rate(engine: LLMEngine, concurrency: int, new_tokens: int, tag: str) -> float:
    params = SamplingParams.create(max_tokens=new_tokens, ignore_eos=True)
    for i in range(concurrency):
        engine.add_request(f"{tag}-{i}", _chat(engine, i), params)
    started: set[str] = set()
    t_decode = None
    while engine.has_unfinished():
        for out in engine.step():
            started.add(out.request_id)
        if t_decode is None and len(started) == concurrency:
            t_decode = time.perf_counter()
    assert t_decode is not None
    return concurrency * (new_tokens - 1) / (time.perf_counter() - t_decode)


def _prefill_rate(engine: LLMEngine, prompt_len: int, count: int) -> float:
    rng = random.Random(0)
    vocab = engine.runner.model.config.vocab_size
    params = SamplingParams.create(max_tokens=1)
    tokens = 0
    t0 = time.perf_counter()
    for i in range(count):
        engine.add_request(f"prefill-{i}", [rng.randrange(100, vocab) for _ in range(prompt_len)], params)
        while engine.has_unfinished():
            engine.step()
        tokens += prompt_len
    return tokens / (time.perf_counter() - t0)


def _hf_rate(model: str | None, prompt_ids: list[int], new_tokens: int, threads: int | None) -> float:
    src = resolve_model(model)
    args = {
        "dir": str(src.path.parent),
        "file": src.path.name,
        "prompt_ids": prompt_ids,
        "new_tokens": new_tokens,
        "threads": threads,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.hf_baseline", json.dumps(args)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["hf_decode_tok_s"]


def run_engine_bench(
    model: str | None, concurrency: list[int], new_tokens: int, prefill_len: int, threads: int | None, hf: bool
) -> dict:
    threads = threads or os.cpu_count() or 1
    max_c = max(concurrency)
    engine = build_engine(EngineConfig(model=model, threads=threads, max_num_seqs=max(64, max_c)), progress=True)
    result: dict = {"model": engine.layout.model_id, "cores": os.cpu_count(), "threads": threads}
    with Progress(transient=True) as bar:
        task = bar.add_task("engine bench", total=len(concurrency) + 2 + int(hf))
        _decode_rate(engine, 2, 8, "warmup")
        result["decode_tok_s"] = {}
        for c in concurrency:
            result["decode_tok_s"][str(c)] = round(_decode_rate(engine, c, new_tokens, f"c{c}"), 2)
            bar.advance(task)
        result["prefill_tok_s"] = round(_prefill_rate(engine, prefill_len, 4), 1)
        bar.advance(task)
        if hf:
            result["hf_decode_tok_s"] = round(_hf_rate(model, _chat(engine, 0), new_tokens, threads), 2)
            bar.advance(task)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    d = result["decode_tok_s"]
    if "1" in d and str(max_c) in d:
        result[f"decode_scaling_{max_c}_over_1"] = round(d[str(max_c)] / d["1"], 2)
    if hf and "1" in d:
        result["decode_1_over_hf"] = round(d["1"] / result["hf_decode_tok_s"], 3)
    if engine.blocks.leaks():
        raise RuntimeError(f"KV blocks leaked during the benchmark: {engine.blocks.leaks()}")
    return result
