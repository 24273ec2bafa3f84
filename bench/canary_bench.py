"""`kvrelay bench canary`: how fast a broken canary is rolled back, and what it cost.

A route sends `canary_weight`% of its users (sticky by user) to a canary model on a worker of its own
(SmolLM2 served int8, from the repository) and the rest to the stable model (SmolLM2 fp16). Clients
send short requests back to back, each as a new user. After `healthy_s` the canary's worker is killed:
its requests fail from then on. The judge runs at its default settings. Reported: the time from the
kill to the rollback landing in the route store, the share of all requests that the route gave to
the broken variant, and the client requests that failed (all of them should be the canary's).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from bench.models_bench import _repository
from common.repository.store import ROOT_ENV
from gateway.routes.assign import choose
from gateway.routes.spec import RouteSpec, Variant
from gateway.routes.store import MemoryRouteStore
from kvrelay.launcher import Cluster, free_port


@dataclass
class _Sent:
    at: float
    variant: str  # where the route's sticky assignment sends this user (before any rollback)
    status: int | None


async def _clients(url: str, spec: RouteSpec, n: int, stop: asyncio.Event, log: list[_Sent]) -> None:
    rng = random.Random(0)
    counter = iter(range(10**9))

    async def client(c: httpx.AsyncClient) -> None:
        while not stop.is_set():
            user = f"user-{next(counter)}"
            body = {
                "model": spec.name,
                "messages": [{"role": "user", "content": f"Say one word. ({user})"}],
                "max_tokens": 4,
                "user": user,
            }
            sent = _Sent(time.monotonic(), choose(spec, user, rng).name, None)
            with contextlib.suppress(httpx.HTTPError):  # no status: counted as failed
                sent.status = (await c.post(f"{url}/v1/chat/completions", json=body)).status_code
            log.append(sent)

    async with httpx.AsyncClient(timeout=120) as c:
        await asyncio.gather(*(client(c) for _ in range(n)))


def run_canary_bench(canary_weight: int, clients: int, healthy_s: float, after_s: float, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as logs:
        stable_model, canary_model = _repository(root)
        routes = Path(logs) / "routes.json"
        store = MemoryRouteStore(path=routes)
        spec = store.set(
            RouteSpec(
                name="chat",
                variants=[
                    Variant(name="stable", model=stable_model, weight=100 - canary_weight),
                    Variant(name="canary", model=canary_model, weight=canary_weight),
                ],
            )
        )
        config = Path(logs) / "gateway.yaml"
        config.write_text(yaml.safe_dump({"routes_file": str(routes)}))
        cluster = Cluster(log_dir=logs, env={ROOT_ENV: root})
        threads = max(1, (os.cpu_count() or 2) // 2)
        try:
            stable = cluster.worker("decode", free_port(), threads, stable_model, ["--kv-cache-mb", "64"])
            canary = cluster.worker("decode", free_port(), threads, canary_model, ["--kv-cache-mb", "64"])
            models = f"{stable_model},{canary_model}"
            url = cluster.gateway(
                free_port(), [], [stable, canary], None, ["--models", models, "--config", str(config)]
            )
            cluster.wait_ready(url, timeout=300, want_mode="colocated")
            _wait_healthy(url, 2)  # ready needs one decode worker; traffic must find both
            canary_proc = cluster.procs[1][1]
            result = asyncio.run(_drive(url, spec, store, canary_proc.pid, clients, healthy_s, after_s, timeout_s))
        finally:
            cluster.stop()
    return {"canary_weight": canary_weight, "clients": clients, "healthy_s": healthy_s, **result}


async def _drive(
    url: str,
    spec: RouteSpec,
    store: MemoryRouteStore,
    canary_pid: int,
    clients: int,
    healthy_s: float,
    after_s: float,
    timeout_s: float,
) -> dict:
    log: list[_Sent] = []
    stop = asyncio.Event()
    traffic = asyncio.create_task(_clients(url, spec, clients, stop, log))
    await asyncio.sleep(healthy_s)
    healthy = list(log)
    os.kill(canary_pid, signal.SIGKILL)
    broke = time.monotonic()
    rolled = None
    while time.monotonic() - broke < timeout_s:
        if (await asyncio.to_thread(store.get, "chat")).rolled_back is not None:
            rolled = time.monotonic()
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(after_s)
    stop.set()
    await traffic
    after = [s for s in log if s.at >= broke]
    bad = [s for s in after if s.variant == "canary" and (rolled is None or s.at < rolled)]
    failed = [s for s in log if s.status != 200]
    record = store.get("chat").rolled_back
    return {
        "healthy_requests": len(healthy),
        "healthy_failed": sum(s.status != 200 for s in healthy),
        "healthy_canary_requests": sum(s.variant == "canary" for s in healthy),
        "requests_after_break": len(after),
        "rollback_reason": record.reason if record else None,
        "rollback_s": round(rolled - broke, 2) if rolled is not None else None,
        # Of every request of the run, those the route gave to the canary while it was broken.
        "bad_variant_share": round(len(bad) / len(log), 4) if log else None,
        "bad_share_while_broken": round(len(bad) / max(1, sum(s.at < rolled for s in after)), 4) if rolled else None,
        "failed_requests": len(failed),
        "failed_not_canary": sum(s.variant != "canary" for s in failed),
    }


def _wait_healthy(url: str, n: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while len(httpx.get(f"{url}/ready", timeout=10).json()["workers"]["decode"]["healthy"]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} decode workers healthy after {timeout:.0f}s")
        time.sleep(0.5)
