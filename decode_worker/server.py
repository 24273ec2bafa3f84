"""`kvrelay decode`: a decode worker process."""

from __future__ import annotations

import logging

import grpc

from common.discovery.record import RegistryKeys
from common.discovery.redis_client import open_redis
from common.engine.async_engine import AsyncEngine
from common.rpc import decode_pb2_grpc
from common.rpc.channels import ChannelPool
from common.serving.bootstrap import run_worker
from common.serving.worker_servicer import WorkerIdentity
from common.settings import WorkerSettings
from decode_worker.servicer import DecodeServicer
from decode_worker.sources import TrustedSources
from kvtransfer.base import make_client
from kvtransfer.handles import HandleSigner
from kvtransfer.nixl_backend import nixl_available, restrict_ucx

log = logging.getLogger(__name__)


async def serve(settings: WorkerSettings) -> None:
    if settings.transfer == "nixl" and not nixl_available():
        raise SystemExit("transfer backend 'nixl' is not available; install kvrelay[nixl]")
    if settings.transfer == "nixl":
        restrict_ucx(settings.nixl_net_devices, settings.host)
    secret = settings.shared_secret()
    registry = open_redis(settings.registry) if settings.registry else None
    sources = TrustedSources(
        HandleSigner(secret) if secret else None,
        settings.prefill_peers,
        registry,
        RegistryKeys(settings.registry_prefix),
        secret,
    )
    if not (secret or settings.prefill_peers or registry):
        log.warning("no shared KV-handle key, prefill peers or registry: KV is pulled from loopback addresses only")

    def add(server: grpc.aio.Server, engine: AsyncEngine, identity: WorkerIdentity) -> ChannelPool:
        channels = ChannelPool(settings.tls)  # to prefill workers: mutual TLS when configured
        # One backend, the worker's own setting; a NIXL agent exists only when it is NIXL.
        client = make_client(settings.transfer, engine.cache, channels, f"{identity.worker_id}-nixl")
        servicer = DecodeServicer(engine, {settings.transfer: client}, settings.transfer, channels, sources)
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
        return channels

    await run_worker(settings, add, (settings.transfer,))
