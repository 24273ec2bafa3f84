"""What the chaos benchmark sends and how it judges each answer.

A fixed pool of prompts, each sent once to the undisturbed cluster for its reference output and
then again and again while workers die: short chat turns on /v1/chat/completions and long
(~1,000-token) prompts on /v1/completions, all streaming, greedy, with `return_token_ids`. Because
sampling is greedy, a request that completes must reproduce its reference token for token, whether
or not it was migrated or retried on the way; a repeated prompt also meets the prefix cache, as
shared documents do in production.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx

from bench.loadgen import Sample, stream_request

CHAT_TURNS = (
    "What is the capital of France?",
    "Give me three tips for writing clear emails.",
    "Why is the sky blue? Keep it short.",
    "Translate 'good morning' into Spanish and German.",
    "What does a hash function do?",
    "Name two uses of a linked list.",
    "How many legs does a spider have?",
    "Suggest a name for a grey cat.",
    "What is 17 times 3?",
    "Explain what an API is in one sentence.",
    "What should I pack for a day hike?",
    "Write a haiku about autumn.",
)


@dataclass(frozen=True)
class Prompt:
    index: int
    kind: str  # "chat" | "long"
    path: str
    body: dict  # the request without model / stream / sampling fields
    prompt_tokens: int


def plan_pool(n: int, long_share: float, long_tokens: int, max_tokens: int, tokenizer, seed: int) -> list[Prompt]:  # noqa: ANN001
    """n prompts, round(n * long_share) of them long. Long prompts are random token ids (exact
    lengths) and ignore EOS, so each costs the same every time; chat turns stop where the model does."""
    rng = random.Random(seed)
    n_long = round(n * long_share)
    pool: list[Prompt] = []
    for i in range(n - n_long):
        q = CHAT_TURNS[i % len(CHAT_TURNS)]
        if i >= len(CHAT_TURNS):
            q += f" Answer in {i // len(CHAT_TURNS) + 1} sentences."
        messages = [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": q}]
        body = {"messages": messages, "max_tokens": max_tokens}
        pool.append(Prompt(len(pool), "chat", "/v1/chat/completions", body, len(tokenizer.encode_chat(messages))))
    low = min(100, tokenizer.vocab_size // 2)
    for _ in range(n_long):
        ids = [rng.randrange(low, tokenizer.vocab_size) for _ in range(long_tokens)]
        body = {"prompt": ids, "max_tokens": max_tokens, "ignore_eos": True}
        pool.append(Prompt(len(pool), "long", "/v1/completions", body, long_tokens))
    return pool


async def send(client: httpx.AsyncClient, url: str, model: str, p: Prompt, timeout_s: float) -> Sample:
    """One streaming request; one that has not ended after timeout_s is a failure (a hung stream)."""
    body = {**p.body, "model": model, "stream": True, "temperature": 0, "return_token_ids": True}
    s = Sample(p.kind, p.prompt_tokens, time.perf_counter())
    try:
        await asyncio.wait_for(stream_request(client, url, p.path, body, s), timeout_s)
    except TimeoutError:
        s.error = f"no end of stream after {timeout_s:.0f}s"
    return s


async def reference(
    client: httpx.AsyncClient, url: str, model: str, pool: list[Prompt], timeout_s: float, attempts: int = 3
) -> tuple[dict[int, list[int]], list[str]]:
    """Each prompt's output on the undisturbed cluster, two at a time. A prompt that never completes
    (after `attempts` tries) has no reference; its later completions are counted as unchecked."""
    gate = asyncio.Semaphore(2)
    refs: dict[int, list[int]] = {}
    errors: list[str] = []

    async def one(p: Prompt) -> None:
        async with gate:
            for _ in range(attempts):
                s = await send(client, url, model, p, timeout_s)
                if not s.error:
                    refs[p.index] = s.token_ids
                    return
            errors.append(f"prompt {p.index} ({p.kind}): {s.error}")

    await asyncio.gather(*(one(p) for p in pool))
    return refs, errors


@dataclass
class Tally:
    """Every request's outcome, as the benchmark's report counts them."""

    sent: int = 0
    accepted: int = 0  # HTTP 200
    rejected_429: int = 0
    completed: int = 0  # finish_reason and [DONE]
    failed: int = 0  # accepted but not completed, or a status other than 200 and 429, or no response
    token_mismatches: int = 0  # completed with other tokens than the reference
    unchecked: int = 0  # completed, but the prompt has no reference
    by_kind: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # failure message (truncated) -> count
    mismatch_examples: list[dict] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def add(self, p: Prompt, s: Sample, ref: list[int] | None) -> None:
        self.samples.append(s)
        self.by_kind[p.kind] = self.by_kind.get(p.kind, 0) + 1
        if s.rejected:
            self.rejected_429 += 1
            return
        if s.status == 200:
            self.accepted += 1
        if s.error:
            self.failed += 1
            key = s.error[:120]
            self.errors[key] = self.errors.get(key, 0) + 1
            return
        self.completed += 1
        if ref is None:
            self.unchecked += 1
        elif s.token_ids != ref:
            self.token_mismatches += 1
            if len(self.mismatch_examples) < 3:
                at = next((i for i, (a, b) in enumerate(zip(s.token_ids, ref, strict=False)) if a != b), None)
                at = min(len(s.token_ids), len(ref)) if at is None else at
                self.mismatch_examples.append(
                    {"prompt": p.index, "kind": p.kind, "first_diff_at": at, "got": len(s.token_ids), "want": len(ref)}
                )
