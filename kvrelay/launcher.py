"""`kvrelay up`: gateway and workers as separate processes on this machine.

Cores are divided between the prefill and decode pools so that workers never oversubscribe the
machine. Children die with the launcher (PR_SET_PDEATHSIG), and Ctrl-C / SIGTERM stop them all.
Ports are the documented defaults (gateway 8000, prefill 50051+, decode 50061+, worker metrics on
the gRPC port + 1000) unless asked for 0, which picks ports free at start (tests, shared machines).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from kvrelay.parent import launched_env

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class CorePlan:
    prefill_threads: int
    decode_threads: int
    note: str


def divide_cores(cores: int, prefill: int, decode: int) -> CorePlan:
    """Threads per worker. Pools get cores in proportion to their worker counts (at least one each)."""
    workers = prefill + decode
    if prefill == 0:
        t = max(1, cores // decode)
        return CorePlan(0, t, f"{cores} cores: {decode} decode worker(s) x {t} thread(s)")
    if cores < workers:
        return CorePlan(1, 1, f"{cores} cores for {workers} workers: 1 thread each (they share cores)")
    p_cores = max(prefill, min(cores - decode, round(cores * prefill / workers)))
    d_cores = cores - p_cores
    p, d = p_cores // prefill, d_cores // decode
    return CorePlan(p, d, f"{cores} cores: {prefill} prefill x {p} thread(s), {decode} decode x {d} thread(s)")


METRICS_OFFSET = 1000  # a worker serves Prometheus metrics on its gRPC port + this (its default)
_handed_out: set[int] = set()


def _hold(held: contextlib.ExitStack, host: str, port: int) -> int | None:
    """Bind `port` (0: any) and keep it bound until `held` closes; the port, or None if taken."""
    s = held.enter_context(socket.socket())
    try:
        s.bind((host, port))
    except (OSError, OverflowError):
        return None
    return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1", paired: int = 0) -> list[int]:
    """`n` distinct ports nothing listens on now and that this process never handed out before: a
    child binds its port only after loading a model, and a sibling started meanwhile must not be
    given the same one. With `paired`, each port's port + paired is free and reserved too (a
    worker's metrics port)."""
    with contextlib.ExitStack() as held:  # a held socket keeps the kernel from offering its port again
        ports: list[int] = []
        while len(ports) < n:
            port = _hold(held, host, 0)
            if port is None or port in _handed_out:
                continue
            if paired and (port + paired in _handed_out or _hold(held, host, port + paired) is None):
                continue
            ports.append(port)
        _handed_out.update(ports)
        _handed_out.update(p + paired for p in ports if paired)
        return ports


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_worker_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """gRPC ports for `n` workers, each with its metrics port (gRPC port + METRICS_OFFSET) free too."""
    return free_ports(n, host, paired=METRICS_OFFSET)


@dataclass(frozen=True)
class PortPlan:
    gateway: int
    prefill: list[int]  # gRPC ports; each worker's metrics on its port + METRICS_OFFSET
    decode: list[int]


def plan_ports(port: int, base_port: int | None, prefill: int, decode: int, host: str = "127.0.0.1") -> PortPlan:
    """`kvrelay up`'s ports. `port` 0 picks a free one for the gateway; `base_port` 0 picks free
    worker ports (their metrics ports free too); otherwise prefill workers take base_port (default
    50051) onwards and decode workers base_port + 10 onwards."""
    gateway = free_port(host) if port == 0 else port
    if base_port == 0:
        picked = free_worker_ports(prefill + decode, host)
        return PortPlan(gateway, picked[:prefill], picked[prefill:])
    base = base_port or 50051
    return PortPlan(gateway, [base + i for i in range(prefill)], [base + 10 + i for i in range(decode)])


def _die_with_parent() -> None:
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Cluster:
    """A set of kvrelay processes started together; also what the integration tests use."""

    host: str = "127.0.0.1"
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    log_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # for every process started

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(os.path.join(self.log_dir, f"{name}.log"), "wb") if self.log_dir else None  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvrelay.cli", *args],
            env={**os.environ, **self.env, **(env or {}), **launched_env()},
            stdout=out or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if out else None,
        )
        self.procs.append((name, proc))
        return proc

    def worker(self, role: str, port: int, threads: int, model: str | None, extra: list[str] | None = None) -> str:
        args = [role, "--host", self.host, "--port", str(port), "--threads", str(threads), "--log-level", "warning"]
        if "--worker-id" not in (extra or []):
            args += ["--worker-id", f"{role}-{port}"]  # readable and stable (logs, metrics, routing headers)
        if model:
            args += ["--model", model]
        self.spawn(f"{role}-{port}", args + (extra or []), {"OMP_NUM_THREADS": str(threads)})
        return f"{self.host}:{port}"

    def gateway(
        self,
        port: int,
        prefill: list[str],
        decode: list[str],
        model: str | None,
        extra: list[str] | None = None,
    ) -> str:
        args = ["gateway", "--host", self.host, "--port", str(port), "--log-level", "warning"]
        for a in prefill:
            args += ["--prefill", a]
        for a in decode:
            args += ["--decode", a]
        if model:
            args += ["--model", model]
        # On loopback (kvrelay up, the tests) API keys are off unless asked for; elsewhere they are on.
        env = (
            {"KVRELAY_AUTH__ENABLED": "false"}
            if _loopback(self.host) and "KVRELAY_AUTH__ENABLED" not in self.env
            else {}
        )
        self.spawn(f"gateway-{port}", args + (extra or []), env)
        return f"http://{self.host}:{port}"

    def wait_ready(self, url: str, timeout: float = 180.0, want_mode: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                r = httpx.get(f"{url}/ready", timeout=2.0)
                last = r.json()
                if r.status_code == 200 and (want_mode is None or last.get("mode") == want_mode):
                    return last
            except httpx.HTTPError as e:
                last = str(e)
            time.sleep(0.3)
        raise TimeoutError(f"{url} not ready after {timeout:.0f}s: {last}")

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}")

    def stop(self, timeout: float = 15.0) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def up(
    port: int,
    prefill: int,
    decode: int,
    transfer: str,
    model: str | None,
    host: str,
    base_port: int | None,
    log_dir: str | None,
    registry: str | None = None,
    models: str | None = None,
    memory_budget_mb: int | None = None,
) -> int:
    plan = divide_cores(os.cpu_count() or 1, prefill, decode)
    print(f"kvrelay up: {plan.note}", flush=True)
    if _loopback(host):
        print("kvrelay up: API keys are off (loopback only); with --host elsewhere they are on: `kvrelay keys add`")
    ports = plan_ports(port, base_port, prefill, decode, host)
    cluster = Cluster(host=host, log_dir=log_dir)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # With a registry, workers announce themselves and the gateway finds them there.
    reg = ["--registry", registry] if registry else []
    # Several models: every worker serves them all (within its budget), the gateway knows each.
    many = ["--models", models] if models else []
    budget = ["--memory-budget-mb", str(memory_budget_mb)] if memory_budget_mb else []
    try:
        p_extra = ["--transfer", transfer, *reg, *many, *budget]  # a NIXL agent only when NIXL is the backend
        p_addrs = [cluster.worker("prefill", p, plan.prefill_threads, model, p_extra) for p in ports.prefill]
        # Decode workers pull KV only from the prefill workers they were told of (or registered ones).
        d_extra = ["--transfer", transfer, *reg, *many, *budget, *(f"--prefill-peer={a}" for a in p_addrs)]
        d_addrs = [cluster.worker("decode", p, plan.decode_threads, model, d_extra) for p in ports.decode]
        for role, role_ports in (("prefill", ports.prefill), ("decode", ports.decode)):
            for p in role_ports:
                print(f"kvrelay up: {role} worker at {host}:{p} (metrics {host}:{p + METRICS_OFFSET})", flush=True)
        if registry:
            url = cluster.gateway(ports.gateway, [], [], model, [*reg, *many])
        else:
            url = cluster.gateway(ports.gateway, p_addrs, d_addrs, model, many)
        want = "disaggregated" if prefill else "colocated"
        deadline = time.monotonic() + 300
        while not stop:
            try:
                cluster.wait_ready(url, timeout=1.0, want_mode=want)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        if not stop:
            print(f"kvrelay is ready at {url}/v1 (mode: {want}; Ctrl-C stops it)", flush=True)
        while not stop:
            cluster.check_alive()
            time.sleep(0.5)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"kvrelay up: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("kvrelay up: stopping", flush=True)
        cluster.stop()
