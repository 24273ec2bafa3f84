"""`kvrelay prefill`: a prefill worker process."""

from __future__ import annotations

import grpc

from common.engine.async_engine import AsyncEngine
from common.rpc import kv_pb2_grpc, prefill_pb2_grpc
from common.serving.bootstrap import run_worker
from common.serving.worker_servicer import WorkerIdentity
from common.settings import WorkerSettings
from kvtransfer.nixl_backend import NixlKVServer, nixl_available
from prefill_worker.servicer import KVServicer, PrefillServicer


async def serve(settings: WorkerSettings) -> None:
    backends = ("grpc", "nixl") if nixl_available() else ("grpc",)

    def add(server: grpc.aio.Server, engine: AsyncEngine, identity: WorkerIdentity) -> NixlKVServer | None:
        nixl = NixlKVServer(engine.engine.cache, identity.worker_id) if "nixl" in backends else None
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(PrefillServicer(engine, identity), server)
        kv_pb2_grpc.add_KVServiceServicer_to_server(KVServicer(engine, nixl), server)
        return nixl

    await run_worker(settings, add, backends)
