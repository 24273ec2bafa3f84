"""One kvrelay process (gateway, prefill or decode worker) owned by one Ray actor.

The actor runs the same `kvrelay <role>` command a container would, as its child, so a Ray pool
behaves exactly like any other deployment: the worker registers in Redis, drains on SIGTERM, and
the gateway finds it there. Ray contributes placement (`num_cpus`/`num_gpus` per role, any node of
the cluster) and restarts: the child dies with its actor (PR_SET_PDEATHSIG), and the actor dies with
an unexpected exit of its child, so Ray's `max_restarts` brings both back. Ports are picked free on
the actor's node and the node's IP is advertised, so several workers share a node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrelay.launcher import free_port, free_worker_ports
from kvrelay.parent import launched_env

READY_TIMEOUT_S = 300.0
_POLL_S = 0.2


class RoleProcess:
    """The body of a pool member's Ray actor (see `pools.py` for how it is made remote)."""

    def __init__(
        self, role: str, name: str, args: list[str], env: dict[str, str], host: str | None = None, port: int = 0
    ) -> None:
        import ray

        self.role, self.name = role, name
        self.host = host or ray.util.get_node_ip_address()
        self._stopping = False
        child_env = {**os.environ, **env}
        if role == "gateway":
            self.port = port or free_port(self.host)
            cmd = ["gateway", "--host", self.host, "--port", str(self.port)]
        else:
            self.port = free_worker_ports(1, self.host)[0]
            self.health_port = free_port(self.host)
            child_env["KVRELAY_HEALTH_PORT"] = str(self.health_port)  # plaintext, even when gRPC is mTLS
            cmd = [role, "--host", self.host, "--port", str(self.port), "--worker-id", name]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvrelay.cli", *cmd, *args],
            env={**child_env, **launched_env()},
        )
        self._wait_ready()
        threading.Thread(target=self._watch_child, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _ready(self) -> bool:
        if self.role == "gateway":
            try:
                return httpx.get(f"http://{self.address}/health", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False
        try:
            with grpc.insecure_channel(f"{self.host}:{self.health_port}") as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} while starting")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise TimeoutError(f"{self.name} did not become ready within {READY_TIMEOUT_S:.0f}s")
            time.sleep(_POLL_S)

    def _watch_child(self) -> None:
        code = self.proc.wait()
        if not self._stopping:  # it died on its own: take the actor down too, so Ray restarts both
            print(f"{self.name} exited with code {code}; restarting", file=sys.stderr, flush=True)
            os._exit(1)

    def info(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "address": self.address,
            "pid": self.proc.pid,
            "alive": self.proc.poll() is None,
        }

    def drain(self, timeout_s: float = 90.0) -> int:
        """SIGTERM: a worker deregisters and finishes what it has (the gateway its streams), then
        exits. Returns its exit code (killed after `timeout_s`)."""
        self._stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
