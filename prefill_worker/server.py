"""`kvrelay prefill`: a prefill worker process."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc

from common.engine.async_engine import AsyncEngine
from common.rpc import kv_pb2_grpc, prefill_pb2_grpc
from common.serving.bootstrap import run_worker
from common.serving.model_pool import ModelPool
from common.serving.worker_servicer import WorkerIdentity
from common.settings import WorkerSettings
from kvtransfer.handles import HandleSigner
from kvtransfer.nixl_backend import NixlKVServer, nixl_available, restrict_ucx
from kvtransfer.service import KVDispatch, KVService
from kvtransfer.source import EngineKVSource
from prefill_worker.servicer import PrefillDispatch, PrefillServicer


@dataclass
class PrefillModelServices:
    """One model's prefill services: its PrefillService and KVService (and NIXL agent, if any)."""

    prefill: PrefillServicer
    kv: KVService
    nixl: NixlKVServer | None

    def close(self) -> None:
        if self.nixl is not None:
            self.nixl.close()


class PrefillRole:
    def __init__(self, settings: WorkerSettings) -> None:
        # gRPC pulls are always served; NIXL (and its UCX agent, which listens on the network) only on request.
        self.backends = ("grpc", "nixl") if settings.transfer == "nixl" else ("grpc",)
        self.signer = HandleSigner(settings.shared_secret())

    def for_model(self, engine: AsyncEngine, identity: WorkerIdentity) -> PrefillModelServices:
        # Unique per load: a reloaded model's agent has new memory registrations under a new name.
        agent = f"{identity.worker_id}/{engine.layout.model_id}/{uuid.uuid4().hex[:6]}"
        nixl = NixlKVServer(engine.cache, agent) if "nixl" in self.backends else None
        source = EngineKVSource(engine, self.signer, identity.worker_id, identity.address)
        return PrefillModelServices(PrefillServicer(engine, source), KVService(source, engine.cache, nixl), nixl)

    def register(self, server: grpc.aio.Server, pool: ModelPool) -> None:
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(PrefillDispatch(pool), server)
        kv_pb2_grpc.add_KVServiceServicer_to_server(KVDispatch(pool), server)

    async def close(self) -> None:
        pass


async def serve(settings: WorkerSettings) -> None:
    if settings.transfer == "nixl" and not nixl_available():
        raise SystemExit("transfer backend 'nixl' is not available; install kvrelay[nixl]")
    if settings.transfer == "nixl":
        restrict_ucx(settings.nixl_net_devices, settings.host)
    await run_worker(settings, PrefillRole(settings))
