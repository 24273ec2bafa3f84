"""The engine's throughput measures, in-process.

decode_rate: c requests with short chat prompts generate `new_tokens` each; the rate counts tokens
after the first and the time after every request has its first token (the decode phase). Also
returns the most KV blocks the run held at once.
prefill_rate: distinct `prompt_len`-token prompts, one at a time, max_tokens=1, no cache hits.
"""

from __future__ import annotations

import random
import time

from common.engine.llm_engine import LLMEngine
from common.engine.sampling import SamplingParams

TOPICS = ["the sea", "a robot", "mountains", "a city at night", "bread", "a comet", "rain", "chess"]


def chat(engine: LLMEngine, i: int) -> list[int]:
    topic = TOPICS[i % len(TOPICS)]
    return engine.tokenizer.encode_chat([{"role": "user", "content": f"Write story {i} about {topic}."}])


def decode_rate(engine: LLMEngine, concurrency: int, new_tokens: int, tag: str) -> tuple[float, int]:
    params = SamplingParams.create(max_tokens=new_tokens, ignore_eos=True)
    for i in range(concurrency):
        engine.add_request(f"{tag}-{i}", chat(engine, i), params)
    started: set[str] = set()
    t_decode = None
    peak_blocks = 0
    while engine.has_unfinished():
        for out in engine.step():
            started.add(out.request_id)
        peak_blocks = max(peak_blocks, engine.blocks.num_used_blocks)
        if t_decode is None and len(started) == concurrency:
            t_decode = time.perf_counter()
    assert t_decode is not None
    return concurrency * (new_tokens - 1) / (time.perf_counter() - t_decode), peak_blocks


def prefill_rate(engine: LLMEngine, prompt_len: int, count: int) -> float:
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
