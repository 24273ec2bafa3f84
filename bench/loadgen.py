"""An open-loop load generator: Poisson arrivals, prompt and output lengths from a mix, streaming
requests to /v1/completions with token-id prompts (exact lengths), per-token timestamps.

`stream_request` is the one SSE reader of the benchmarks: it records how a stream ended (HTTP
status, finish_reason, `data: [DONE]`, an error event, a cut) so that a 429 is told apart from a
failure, and a failure from a completion."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console
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
    """One streamed request as its client saw it. `error` is set for every request that did not
    complete: a non-200 status (429 included; see `rejected`), an SSE error event, a cut stream."""

    kind: str
    prompt_tokens: int
    sent: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    status: int | None = None  # None: no HTTP response at all
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def rejected(self) -> bool:
        """Turned away by admission control: load shedding, not a failure."""
        return self.status == 429

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


def plan_requests(
    n: int, mix: tuple[Mix, ...], vocab: int, seed: int, max_len: int | None = None
) -> list[tuple[str, list[int], int]]:
    """max_len (the served context) shortens prompts that would not fit with their output, so a
    small test model gets the same workload shape instead of 400s; the draws are the same."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = rng.choices(mix, weights=[x.share for x in mix])[0]
        plen, olen = rng.randint(*m.prompt), rng.randint(*m.output)
        prompt = [rng.randrange(100, vocab) for _ in range(plen)]
        out.append((m.name, prompt[: max_len - olen] if max_len else prompt, olen))
    return out


async def stream_request(client: httpx.AsyncClient, url: str, path: str, body: dict, s: Sample) -> Sample:
    """POST a streaming request (it must ask for `return_token_ids`) and fill `s` as chunks arrive.
    `s` is filled in place, so a caller that times the request out keeps what had arrived."""
    try:
        async with client.stream("POST", f"{url}{path}", json=body) as r:
            s.status = r.status_code
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return s
            async for line in r.aiter_lines():
                if line.strip() == "data: [DONE]":
                    s.done = True
                elif line.startswith("data: {"):
                    data = json.loads(line[6:])
                    if "error" in data:
                        err = data["error"]
                        s.error = f"SSE error: {err.get('message', err) if isinstance(err, dict) else err}"
                        return s
                    now = time.perf_counter()
                    for choice in data.get("choices", []):
                        ids = choice.get("token_ids") or []
                        s.token_ids += ids
                        s.token_times += [now] * len(ids)
                        s.finish_reason = choice.get("finish_reason") or s.finish_reason
    except (httpx.HTTPError, httpx.StreamError, json.JSONDecodeError) as e:
        s.error = f"{type(e).__name__}: {e}"
        return s
    if not s.done:
        s.error = "stream ended without data: [DONE]"
    elif s.finish_reason is None:
        s.error = "stream ended without a finish_reason"
    return s


async def send_completion(
    client: httpx.AsyncClient, url: str, model: str, kind: str, prompt: list[int], max_tokens: int
) -> Sample:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    return await stream_request(client, url, "/v1/completions", body, Sample(kind, len(prompt), time.perf_counter()))


async def run_load(
    url: str,
    model: str,
    requests: list[tuple[str, list[int], int]],
    rate: float,
    seed: int,
    label: str,
    headers: dict[str, str] | None = None,
    kind_is_model: bool = False,
) -> tuple[list[Sample], float]:
    """`kind_is_model`: each request's kind names the model it asks for (a mix of models)."""
    rng = random.Random(seed + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), headers=headers) as client:
        tasks = []
        t0 = time.perf_counter()
        with Progress(transient=True, console=Console(stderr=True)) as bar:  # stdout: the JSON only
            task = bar.add_task(f"{label}: {len(requests)} requests at {rate}/s", total=len(requests))
            for kind, prompt, olen in requests:
                asked = kind if kind_is_model else model
                t = asyncio.create_task(send_completion(client, url, asked, kind, prompt, olen))
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


def _round(x: float) -> float | None:
    """4 decimals; None where there was nothing to measure (NaN is not JSON)."""
    return None if math.isnan(x) else round(x, 4)


def summarize(samples: list[Sample], makespan: float, slo_ttft: float, slo_tpot: float) -> dict:
    """Latencies are those of admitted requests that completed; a 429 is counted apart from failures."""
    ok = [s for s in samples if not s.error and s.tokens]
    rejected = sum(s.rejected for s in samples)
    ttft = [s.ttft for s in ok]
    tpot = [t for s in ok if (t := s.tpot) is not None]
    e2e = [s.e2e for s in ok]
    good = [s for s in ok if s.ttft <= slo_ttft and (s.tpot or 0) <= slo_tpot]
    r = _round
    return {
        "requests": len(samples),
        "accepted": sum(s.status == 200 for s in samples),
        "rejected_429": rejected,
        "share_429": r(rejected / len(samples)) if samples else None,
        "failed": len(samples) - len(ok) - rejected,
        "errors": sorted({s.error for s in samples if s.error and not s.rejected})[:3],
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
