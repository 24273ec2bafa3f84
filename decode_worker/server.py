"""`kvrelay decode`: a decode worker process."""

from __future__ import annotations

import grpc

from common.engine.async_engine import AsyncEngine
from common.rpc import decode_pb2_grpc
from common.rpc.channels import ChannelPool
from common.serving.bootstrap import run_worker
from common.serving.worker_servicer import WorkerIdentity
from common.settings import WorkerSettings
from decode_worker.servicer import DecodeServicer
from kvtransfer.base import KVTransferClient, make_client
from kvtransfer.nixl_backend import nixl_available


async def serve(settings: WorkerSettings) -> None:
    backends = ("grpc", "nixl") if nixl_available() else ("grpc",)
    if settings.transfer not in backends:
        raise SystemExit(f"transfer backend {settings.transfer!r} is not available; install kvrelay[nixl]")

    def add(server: grpc.aio.Server, engine: AsyncEngine, identity: WorkerIdentity) -> ChannelPool:
        channels = ChannelPool()
        cache = engine.engine.cache
        clients: dict[str, KVTransferClient] = {
            b: make_client(b, cache, channels, f"{identity.worker_id}-{b}") for b in backends
        }
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(
            DecodeServicer(engine, clients, settings.transfer, channels), server
        )
        return channels

    await run_worker(settings, add, backends)
