"""A cluster the chaos benchmark may break: a redis-server, prefill and decode workers that register
themselves there, and one gateway that finds them only through the registry.

A worker is killed with SIGKILL (no drain, no deregistration: a crash, which the gateway has to
notice on its own) and replaced by a fresh process of the same role on a fresh port under a fresh id,
which registers again. Every process dies with this one (PR_SET_PDEATHSIG, which follows the thread
that spawned it: spawn only from the main thread), and `stop` ends them all, redis last so that the
workers can still deregister while they stop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import grpc
import httpx
import redis

from common.rpc import worker_pb2, worker_pb2_grpc
from kvrelay.launcher import Cluster, _die_with_parent, free_port


@dataclass
class Worker:
    role: str
    port: int
    proc: subprocess.Popen
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def worker_id(self) -> str:
        return f"{self.role}-{self.port}"


@dataclass
class ChaosCluster:
    log_dir: str
    model: str | None
    threads: dict[str, int]  # per role
    cluster: Cluster = field(init=False)
    workers: list[Worker] = field(default_factory=list)
    redis_proc: subprocess.Popen | None = None
    redis_url: str = ""
    url: str = ""

    def __post_init__(self) -> None:
        self.cluster = Cluster(log_dir=self.log_dir, env={"KVRELAY_TRACING__DIR": os.path.join(self.log_dir, "traces")})

    def start(self, prefill: int, decode: int, timeout: float) -> str:
        """redis, the workers, the gateway; returns the gateway URL once it sees every worker healthy."""
        self._start_redis()
        for role, n in (("prefill", prefill), ("decode", decode)):
            for _ in range(n):
                self.add_worker(role)
        port = free_port()
        self.url = self.cluster.gateway(port, [], [], self.model, ["--registry", self.redis_url])
        asyncio.run(self.wait_healthy(timeout))
        return self.url

    def _start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run `make setup` (apt-get install -y redis-server)")
        port = free_port()
        self.redis_proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.log_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded at this point
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.redis_proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def add_worker(self, role: str) -> Worker:
        port = free_port()
        extra = ["--registry", self.redis_url, "--worker-id", f"{role}-{port}"]
        extra += ["--transfer", "grpc"] if role == "decode" else []
        self.cluster.worker(role, port, self.threads[role], self.model, extra)
        w = Worker(role, port, self.cluster.procs[-1][1])
        self.workers.append(w)
        return w

    def kill(self, w: Worker) -> None:
        """SIGKILL: the worker gets no chance to drain, release leases or deregister."""
        w.proc.kill()
        w.proc.wait()
        self._forget(w)

    def crashed(self) -> list[Worker]:
        """Workers that exited without being killed here (forgotten once returned)."""
        gone = [w for w in self.workers if w.proc.poll() is not None]
        for w in gone:
            self._forget(w)
        return gone

    def _forget(self, w: Worker) -> None:
        self.workers.remove(w)
        self.cluster.procs = [(n, p) for n, p in self.cluster.procs if p is not w.proc]

    def check_core_alive(self) -> None:
        """The gateway and redis are not under test here: if one of them dies, the run is void."""
        if self.redis_proc is not None and self.redis_proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {self.redis_proc.returncode}")
        workers = {w.proc for w in self.workers}
        for name, p in self.cluster.procs:
            if p not in workers and p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}; see {self.log_dir}/{name}.log")

    async def wait_healthy(self, timeout: float) -> float:
        """Until the gateway lists every live worker as healthy; returns the seconds waited."""
        t0 = time.monotonic()
        last: object = None
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                self.check_core_alive()
                try:
                    ready = (await client.get(f"{self.url}/ready")).json()
                    healthy = {i for role in ("prefill", "decode") for i in ready["workers"][role]["healthy"]}
                    missing = [w.worker_id for w in self.workers if w.worker_id not in healthy]
                    if not missing:
                        return time.monotonic() - t0
                    last = f"not yet healthy: {missing}"
                except (httpx.HTTPError, KeyError, ValueError) as e:
                    last = e
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"the gateway did not see every worker healthy within {timeout:.0f}s: {last}")
                await asyncio.sleep(0.2)

    async def held_kv(self, settle_s: float) -> tuple[int, list[dict]]:
        """Wait (up to settle_s) until no live worker holds KV, then count what is still held:
        used blocks (total - free) plus pinned, running and waiting requests. Returns that sum and
        the workers that are not clean (a worker whose Stats fails is listed with its error)."""
        deadline = time.monotonic() + settle_s
        while True:
            held = [await _held(w) for w in list(self.workers)]
            dirty = [h for h in held if h.get("held", 1)]
            if not dirty or time.monotonic() > deadline:
                return sum(h.get("held", 0) for h in held), dirty
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        self.cluster.stop()
        self.workers.clear()
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            try:
                self.redis_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()
                self.redis_proc.wait()


async def _held(w: Worker) -> dict:
    try:
        async with grpc.aio.insecure_channel(w.address) as ch:
            s = await worker_pb2_grpc.WorkerServiceStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
    except grpc.aio.AioRpcError as e:
        return {"worker": w.worker_id, "error": f"Stats failed: {e.code().name}"}
    used = s.total_blocks - s.free_blocks
    return {
        "worker": w.worker_id,
        "held": used + s.pinned + s.running + s.waiting,
        "used_blocks": used,
        "pinned": s.pinned,
        "running": s.running,
        "waiting": s.waiting,
    }
