"""An open-loop load generator: Poisson arrivals, prompt and output lengths from a mix, streaming
requests to /v1/completions with token-id prompts (exact lengths), per-token timestamps."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx
from rich.progress import Progress


@dataclass(frozen=True)
class Mix:
    """A share of requests with prompt and output lengths drawn uniformly from ranges."""

    name: str
    share: float
    prompt: tuple[int, int]
    output: tuple[int, int]


DEFAULT_MIX = (
    Mix("chat", 0.7, (20, 120), (32, 96)),
    Mix("long", 0.3, (1000, 1300), (32, 96)),
)


@dataclass
class Sample:
    kind: str
    prompt_tokens: int
    sent: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.tokens - 1)

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.sent

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def plan_requests(n: int, mix: tuple[Mix, ...], vocab: int, seed: int) -> list[tuple[str, list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = rng.choices(mix, weights=[x.share for x in mix])[0]
        plen, olen = rng.randint(*m.prompt), rng.randint(*m.output)
        out.append((m.name, [rng.randrange(100, vocab) for _ in range(plen)], olen))
    return out


async def _one(
    client: httpx.AsyncClient, url: str, model: str, kind: str, prompt: list[int], max_tokens: int
) -> Sample:
    s = Sample(kind, len(prompt), time.perf_counter())
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    s.error = data["error"]["message"]
                    return s
                n = sum(len(c.get("token_ids", [])) for c in data["choices"])
                now = time.perf_counter()
                s.token_times.extend([now] * n)
                s.tokens += n
    except httpx.HTTPError as e:
        s.error = f"{type(e).__name__}: {e}"
    return s


async def run_load(
    url: str, model: str, requests: list[tuple[str, list[int], int]], rate: float, seed: int, label: str
) -> tuple[list[Sample], float]:
    rng = random.Random(seed + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        tasks = []
        t0 = time.perf_counter()
        with Progress(transient=True) as bar:
            task = bar.add_task(f"{label}: {len(requests)} requests at {rate}/s", total=len(requests))
            for kind, prompt, olen in requests:
                t = asyncio.create_task(_one(client, url, model, kind, prompt, olen))
                t.add_done_callback(lambda _: bar.advance(task))
                tasks.append(t)
                await asyncio.sleep(rng.expovariate(rate))
            samples = await asyncio.gather(*tasks)
        return list(samples), time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(samples: list[Sample], makespan: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [s for s in samples if not s.error and s.tokens]
    ttft = [s.ttft for s in ok]
    tpot = [t for s in ok if (t := s.tpot) is not None]
    e2e = [s.e2e for s in ok]
    good = [s for s in ok if s.ttft <= slo_ttft and (s.tpot or 0) <= slo_tpot]
    r = lambda x: round(x, 4)  # noqa: E731
    return {
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "errors": sorted({s.error for s in samples if s.error})[:3],
        "ttft_p50_s": r(percentile(ttft, 0.5)),
        "ttft_p90_s": r(percentile(ttft, 0.9)),
        "ttft_p99_s": r(percentile(ttft, 0.99)),
        "tpot_p50_s": r(percentile(tpot, 0.5)),
        "tpot_p90_s": r(percentile(tpot, 0.9)),
        "tpot_p99_s": r(percentile(tpot, 0.99)),
        "itl_p99_s": r(percentile([i for s in ok for i in s.itls], 0.99)),
        "e2e_p50_s": r(percentile(e2e, 0.5)),
        "e2e_p90_s": r(percentile(e2e, 0.9)),
        "e2e_p99_s": r(percentile(e2e, 0.99)),
        "throughput_tok_s": r(sum(s.tokens for s in ok) / makespan),
        "goodput_rps": r(len(good) / makespan),
        "makespan_s": r(makespan),
        "ttft_mean_s": r(statistics.fmean(ttft)) if ttft else None,
    }
