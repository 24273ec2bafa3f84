"""`kvrelay prefill`: a prefill worker process."""

from __future__ import annotations

import grpc

from common.engine.async_engine import AsyncEngine
from common.rpc import kv_pb2_grpc, prefill_pb2_grpc
from common.serving.bootstrap import run_worker
from common.serving.worker_servicer import WorkerIdentity
from common.settings import WorkerSettings
from kvtransfer.handles import HandleSigner
from kvtransfer.nixl_backend import NixlKVServer, nixl_available, restrict_ucx
from kvtransfer.service import KVService
from kvtransfer.source import EngineKVSource
from prefill_worker.servicer import PrefillServicer


async def serve(settings: WorkerSettings) -> None:
    if settings.transfer == "nixl" and not nixl_available():
        raise SystemExit("transfer backend 'nixl' is not available; install kvrelay[nixl]")
    if settings.transfer == "nixl":
        restrict_ucx(settings.nixl_net_devices, settings.host)
    # gRPC pulls are always served; NIXL (and its UCX agent, which listens on the network) only on request.
    backends = ("grpc", "nixl") if settings.transfer == "nixl" else ("grpc",)
    signer = HandleSigner(settings.shared_secret())

    def add(server: grpc.aio.Server, engine: AsyncEngine, identity: WorkerIdentity) -> NixlKVServer | None:
        nixl = NixlKVServer(engine.cache, identity.worker_id) if "nixl" in backends else None
        source = EngineKVSource(engine, signer, identity.worker_id, identity.address)
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(PrefillServicer(engine, source), server)
        kv_pb2_grpc.add_KVServiceServicer_to_server(KVService(source, engine.cache, nixl), server)
        return nixl

    await run_worker(settings, add, backends)
