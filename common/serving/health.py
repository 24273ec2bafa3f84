"""The standard gRPC health service (grpc.health.v1) of a worker: what Kubernetes' native `grpc:`
probes and compose healthchecks ask. SERVING once the model is loaded and the worker serves,
NOT_SERVING from the moment it starts draining.

It is served on the worker's own port and, when `health_port` is set, also on a plaintext port of
its own that serves nothing else: kubelet's gRPC probes cannot present a client certificate, so
with mutual TLS on the main port they need one that asks for none (and tells nothing but a status).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

_SERVICES = ("", "kvrelay")  # "" is the whole server, as probes ask by default


class WorkerHealth:
    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self._own_server: grpc.aio.Server | None = None

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def serve_alone(self, host: str, port: int) -> int:
        """Also answer on a plaintext port of its own; returns the port (useful when `port` is 0)."""
        self._own_server = grpc.aio.server()
        self.add_to(self._own_server)
        bound = self._own_server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot listen on {host}:{port} for health checks")
        await self._own_server.start()
        return bound

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in _SERVICES:
            await self.servicer.set(name, status)

    async def stop(self) -> None:
        await self.servicer.enter_graceful_shutdown()
        if self._own_server is not None:
            await self._own_server.stop(None)
