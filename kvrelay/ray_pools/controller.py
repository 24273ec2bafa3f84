"""The pools of one `kvrelay ray up`: a named Ray actor ("controller" in namespace "kvrelay") that
owns every member actor, resizes a pool on request, and stops them all in order.

Members are named `{role}-{n}` in the same namespace (what `kvrelay ray status` lists, and what an
operator or a test can `ray.kill` to see Ray restart it). Scaling up starts new members and returns
once they serve; scaling down drains the newest members first (SIGTERM: deregister, finish
in-flight requests), so no request is lost, and only then removes their actors. The controller is
threaded, so `sizes` and `status` answer while a drain is in progress.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

NAMESPACE = "kvrelay"
CONTROLLER = "controller"
ROLES = ("prefill", "decode", "gateway")
STOP_ORDER = ("gateway", "decode", "prefill")  # gateways finish their streams before workers go
_INFO_TIMEOUT_S = 2.0


@dataclass
class PoolSpec:
    """What every member needs; the same for all members of a role."""

    registry: str
    model: str | None = None
    host: str | None = None  # listen address; None: each node's IP
    gateway_port: int = 8000  # gateway i listens on gateway_port + i (0: free ports)
    cpus: dict[str, float] = field(default_factory=lambda: {"prefill": 1.0, "decode": 1.0, "gateway": 0.5})
    gpus: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0, "gateway": 0.0})
    env: dict[str, str] = field(default_factory=dict)  # KVRELAY_* settings for every member
    worker_args: list[str] = field(default_factory=list)  # e.g. ["--transfer", "nixl"]
    drain_timeout_s: float = 90.0

    def args(self, role: str) -> list[str]:
        args = ["--registry", self.registry, "--log-level", "warning"]
        if self.model:
            args += ["--model", self.model]
        if role != "gateway":
            args += ["--threads", str(max(1, math.floor(self.cpus[role]))), *self.worker_args]
        return args

    def member_env(self, role: str) -> dict[str, str]:
        threads = str(max(1, math.floor(self.cpus[role])))
        return {**self.env, "OMP_NUM_THREADS": threads}


class PoolController:
    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.members: dict[str, list[tuple[str, object]]] = {r: [] for r in ROLES}
        self._next = dict.fromkeys(ROLES, 0)
        self._lock = threading.Lock()  # one resize at a time

    def _start(self, role: str, count: int) -> None:
        import ray

        from kvrelay.ray_pools.role_process import RoleProcess

        actor_cls = ray.remote(RoleProcess)
        started = []
        for _ in range(count):
            index = self._next[role]
            self._next[role] += 1
            name = f"{role}-{index}"
            port = self.spec.gateway_port + index if role == "gateway" and self.spec.gateway_port else 0
            handle = actor_cls.options(
                name=name,
                namespace=NAMESPACE,
                num_cpus=self.spec.cpus[role],
                num_gpus=self.spec.gpus[role],
                max_restarts=-1,  # a member that dies comes back
                max_concurrency=4,  # info() answers while drain() waits
                runtime_env={"env_vars": self.spec.member_env(role)},
            ).remote(role, name, self.spec.args(role), self.spec.member_env(role), self.spec.host, port)
            started.append((name, handle))
        ray.get([h.info.remote() for _, h in started])  # returns once each serves
        self.members[role].extend(started)

    def _stop(self, role: str, count: int) -> None:
        import ray

        victims = self.members[role][-count:] if count else []
        ray.get([h.drain.remote(self.spec.drain_timeout_s) for _, h in victims])
        for _, h in victims:
            ray.kill(h, no_restart=True)
        del self.members[role][len(self.members[role]) - len(victims) :]

    def scale(self, role: str, n: int) -> dict[str, int]:
        if role not in ROLES:
            raise ValueError(f"unknown pool {role!r}: use one of {', '.join(ROLES)}")
        if n < 0 or (n == 0 and role in ("decode", "gateway")):
            raise ValueError(f"the {role} pool needs at least {1 if role != 'prefill' else 0} member(s)")
        with self._lock:
            have = len(self.members[role])
            if n > have:
                self._start(role, n - have)
            elif n < have:
                self._stop(role, have - n)
        return self.sizes()

    def sizes(self) -> dict[str, int]:
        return {r: len(m) for r, m in self.members.items()}

    def status(self) -> list[dict]:
        import ray

        out = []
        for role in ROLES:
            for name, h in list(self.members[role]):
                try:
                    out.append(ray.get(h.info.remote(), timeout=_INFO_TIMEOUT_S))
                except Exception as e:  # restarting, or its node is gone
                    out.append({"name": name, "role": role, "address": "", "alive": False, "state": type(e).__name__})
        return out

    def gateway_urls(self) -> list[str]:
        return [f"http://{m['address']}" for m in self.status() if m["role"] == "gateway" and m["address"]]

    def shutdown(self) -> None:
        with self._lock:
            for role in STOP_ORDER:
                self._stop(role, len(self.members[role]))
