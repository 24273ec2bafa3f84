"""`kvrelay bench chaos`: does the service keep its answers while workers crash?

A registry-backed cluster (redis-server, 2 prefill + 2 decode workers, one gateway) serves
open-loop streaming traffic while a random worker is SIGKILLed every --kill-every-s and replaced.
Before any kill, every prompt of the pool is answered once for its reference. Then, for --minutes,
each request is classified (accepted, 429, completed, failed) and every completion's token ids are
compared with the reference (greedy: they must be equal even if the request moved between workers).
After traffic stops and the workers settle, no live worker may hold KV. The gateway's own counters
say how many requests it migrated or retried.

Targets: failed == 0, token_mismatches == 0, leaked_blocks == 0, completed / accepted >= 0.99.
A kill waits until the gateway sees every worker healthy, so a pool is never emptied by the
benchmark itself: each failure is one the system could have avoided.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.chaos_cluster import ChaosCluster
from bench.chaos_report import gateway_counters, report
from bench.chaos_workload import Prompt, Tally, plan_pool, reference, send
from kvrelay.launcher import divide_cores

PREFILL, DECODE = 2, 2
console = Console(stderr=True)  # stdout stays free for the JSON line


@dataclass(frozen=True)
class ChaosConfig:
    """The command's options (see `kvrelay bench chaos --help`)."""

    model: str | None = None
    minutes: float = 5.0
    kill_every_s: float = 30.0
    rate: float = 0.1
    prompts: int = 16
    long_share: float = 0.3
    long_tokens: int = 1000
    max_tokens: int = 48
    request_timeout_s: float = 300.0
    settle_s: float = 30.0
    seed: int = 0
    log_dir: str | None = None


def run_chaos_bench(cfg: ChaosConfig) -> dict:
    from common.model_source import resolve_model
    from common.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_source(resolve_model(cfg.model))  # a bad --model fails here, before any process
    plan = divide_cores(os.cpu_count() or 1, PREFILL, DECODE)
    with _logs(cfg.log_dir) as logs, _sigterm_raises():
        cluster = ChaosCluster(logs, cfg.model, {"prefill": plan.prefill_threads, "decode": plan.decode_threads})
        try:
            console.print(f"chaos: starting redis, {PREFILL} prefill + {DECODE} decode workers, gateway ({plan.note})")
            url = cluster.start(PREFILL, DECODE, timeout=300)
            console.print(f"chaos: ready at {url}; logs in {logs}")
            result = asyncio.run(_run(cluster, url, tokenizer, cfg))
        finally:
            console.print("chaos: stopping the cluster")
            cluster.stop()
    result["workload"]["threads"] = plan.note
    return result


async def _run(cluster: ChaosCluster, url: str, tokenizer, cfg: ChaosConfig) -> dict:  # noqa: ANN001
    rng = random.Random(cfg.seed)  # arrivals and prompts; the victims draw from their own generator
    duration = cfg.minutes * 60
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0)) as client:
        info = (await client.get(f"{url}/v1/models")).json()["data"][0]
        long_tokens = min(cfg.long_tokens, info["max_model_len"] - cfg.max_tokens - 1)  # a tiny model's context
        pool = plan_pool(cfg.prompts, cfg.long_share, long_tokens, cfg.max_tokens, tokenizer, cfg.seed)
        console.print(f"chaos: reference pass over {len(pool)} prompts on the undisturbed cluster")
        t0 = time.monotonic()
        refs, ref_errors = await reference(client, url, info["id"], pool, cfg.request_timeout_s)
        ref_s = time.monotonic() - t0
        console.print(f"chaos: {len(refs)}/{len(pool)} references in {ref_s:.0f}s; now {duration:.0f}s of chaos")

        tally, kills = Tally(), []
        start = time.monotonic()
        end = start + duration
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console, transient=True
        ) as bar:
            task = bar.add_task("chaos", total=duration)
            ticker = asyncio.create_task(_tick(bar, task, tally, kills, end, duration))
            try:
                await asyncio.gather(
                    _traffic(client, url, info["id"], pool, refs, cfg.rate, end, tally, rng, cfg.request_timeout_s),
                    _kill_loop(cluster, random.Random(cfg.seed + 1), cfg.kill_every_s, start, end, kills),
                )
            finally:
                ticker.cancel()
        chaos_s = time.monotonic() - start
        console.print(f"chaos: traffic done ({tally.completed}/{tally.accepted} completed); settling")

        try:
            await cluster.wait_healthy(timeout=60)
        except TimeoutError as e:
            console.print(f"[yellow]chaos: {e}")
        leaked, dirty = await cluster.held_kv(cfg.settle_s)
        counters = await gateway_counters(client, url)
    result = report(tally, kills, leaked, dirty, counters, chaos_s)
    result["reference"] = {"prompts": len(pool), "completed": len(refs), "errors": ref_errors[:3], "s": round(ref_s)}
    result["workload"] = {
        **{k: v for k, v in asdict(cfg).items() if k != "log_dir"},
        "model": cfg.model or "default (SmolLM2-135M-Instruct)",
        "long_tokens": long_tokens,
        "workers": {"prefill": PREFILL, "decode": DECODE},
    }
    return result


async def _traffic(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    pool: list[Prompt],
    refs: dict[int, list[int]],
    rate: float,
    end: float,
    tally: Tally,
    rng: random.Random,
    timeout_s: float,
) -> None:
    """Poisson arrivals until `end` (open loop: nothing waits for earlier requests), then the
    requests in flight are awaited; each ends by itself within timeout_s."""

    async def one(p: Prompt) -> None:
        tally.add(p, await send(client, url, model, p, timeout_s), refs.get(p.index))

    tasks = []
    while time.monotonic() < end:
        p = rng.choice(pool)
        tally.sent += 1
        tasks.append(asyncio.create_task(one(p)))
        await asyncio.sleep(min(rng.expovariate(rate), max(0.0, end - time.monotonic())))
    await asyncio.gather(*tasks)


async def _kill_loop(
    cluster: ChaosCluster, rng: random.Random, every: float, t0: float, end: float, kills: list[dict]
) -> None:
    """Every `every` seconds: restart workers that died on their own, wait until the gateway sees
    every worker healthy, SIGKILL a random one and start its replacement."""
    next_kill = t0 + every
    while next_kill < end:
        await asyncio.sleep(max(0.0, next_kill - time.monotonic()))
        next_kill += every
        for w in cluster.crashed():
            console.print(f"[red]chaos: {w.worker_id} exited by itself (code {w.proc.returncode}); restarting it")
            kills.append({"at_s": round(time.monotonic() - t0, 1), "crashed": w.worker_id})
            cluster.add_worker(w.role)
        try:
            await cluster.wait_healthy(timeout=max(1.0, end - time.monotonic()))
        except TimeoutError as e:
            console.print(f"[yellow]chaos: no kill at {time.monotonic() - t0:.0f}s: {e}")
            continue
        if time.monotonic() >= end:
            return
        victim = rng.choice(cluster.workers)
        at = time.monotonic()
        cluster.kill(victim)
        fresh = cluster.add_worker(victim.role)
        record = {"at_s": round(at - t0, 1), "killed": victim.worker_id, "restarted": fresh.worker_id}
        kills.append(record)
        console.print(f"chaos: t={at - t0:5.0f}s SIGKILL {victim.worker_id}, restarting as {fresh.worker_id}")
        try:
            await cluster.wait_healthy(timeout=max(1.0, min(next_kill, end) - at))
            record["healthy_after_s"] = round(time.monotonic() - at, 1)
        except TimeoutError:
            record["healthy_after_s"] = None  # still starting at the next kill; that one waits for it


async def _tick(bar: Progress, task: int, tally: Tally, kills: list[dict], end: float, duration: float) -> None:
    while True:
        left = end - time.monotonic()
        in_flight = tally.sent - len(tally.samples)
        bar.update(
            task,
            completed=min(duration, duration - left),
            description=(
                f"{'chaos' if left > 0 else 'draining'}: sent {tally.sent} in flight {in_flight} "
                f"completed {tally.completed} failed {tally.failed} 429 {tally.rejected_429} "
                f"mismatch {tally.token_mismatches} kills {sum('killed' in k for k in kills)}"
            ),
        )
        await asyncio.sleep(0.5)


@contextlib.contextmanager
def _logs(log_dir: str | None) -> Iterator[str]:
    """Process logs in --log-dir (kept), or in a temporary directory removed at the end."""
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        yield log_dir
        return
    with tempfile.TemporaryDirectory(prefix="kvrelay-chaos-") as d:
        yield d


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cluster is torn down by the `finally` blocks."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
