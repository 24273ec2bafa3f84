"""`kvrelay decode`: a decode worker process."""

from __future__ import annotations

import logging
import uuid

import grpc

from common.discovery.record import RegistryKeys
from common.discovery.redis_client import open_redis
from common.engine.async_engine import AsyncEngine
from common.rpc import decode_pb2_grpc
from common.rpc.channels import ChannelPool
from common.serving.bootstrap import run_worker
from common.serving.model_pool import ModelPool
from common.serving.worker_servicer import WorkerIdentity
from common.settings import WorkerSettings
from decode_worker.servicer import DecodeDispatch, DecodeServicer
from decode_worker.sources import TrustedSources
from kvtransfer.base import make_client
from kvtransfer.handles import HandleSigner
from kvtransfer.nixl_backend import nixl_available, restrict_ucx

log = logging.getLogger(__name__)


class DecodeRole:
    def __init__(self, settings: WorkerSettings) -> None:
        secret = settings.shared_secret()
        registry = open_redis(settings.registry) if settings.registry else None
        self.sources = TrustedSources(
            HandleSigner(secret) if secret else None,
            settings.prefill_peers,
            registry,
            RegistryKeys(settings.registry_prefix),
            secret,
        )
        if not (secret or settings.prefill_peers or registry):
            log.warning("no shared KV-handle key, prefill peers or registry: KV is pulled from loopback addresses only")
        self.transfer = settings.transfer
        self.backends = (settings.transfer,)
        self.channels = ChannelPool(settings.tls)  # to prefill workers: mutual TLS when configured

    def for_model(self, engine: AsyncEngine, identity: WorkerIdentity) -> DecodeServicer:
        # One backend, the worker's own setting; a NIXL agent exists only when it is NIXL (named
        # uniquely per load: a reloaded model registers new memory).
        agent = f"{identity.worker_id}/{engine.layout.model_id}/{uuid.uuid4().hex[:6]}-nixl"
        client = make_client(self.transfer, engine.cache, self.channels, agent)
        return DecodeServicer(engine, {self.transfer: client}, self.transfer, self.channels, self.sources)

    def register(self, server: grpc.aio.Server, pool: ModelPool) -> None:
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(DecodeDispatch(pool), server)

    async def close(self) -> None:
        await self.channels.close()


async def serve(settings: WorkerSettings) -> None:
    if settings.transfer == "nixl" and not nixl_available():
        raise SystemExit("transfer backend 'nixl' is not available; install kvrelay[nixl]")
    if settings.transfer == "nixl":
        restrict_ucx(settings.nixl_net_devices, settings.host)
    await run_worker(settings, DecodeRole(settings))
