"""KVService, served by the prefill role: the server half of both transfer backends. Every call
presents the request's KV handle, and `KVSource` decides whether it holds."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from common.errors import InvalidRequestError, KVRelayError
from common.kv.cache import KVCache
from common.rpc import kv_pb2, kv_pb2_grpc
from common.serving.model_pool import ModelPool
from kvtransfer.grpc_backend import stream_blocks
from kvtransfer.nixl_backend import NixlKVServer
from kvtransfer.source import KVSource


class KVService(kv_pb2_grpc.KVServiceServicer):
    def __init__(self, source: KVSource, cache: KVCache, nixl: NixlKVServer | None) -> None:
        self.source = source
        self.cache = cache
        self.nixl = nixl

    async def PullBlocks(  # noqa: N802
        self, request: kv_pb2.PullBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.BlockChunk]:
        block_ids = await self.source.pinned_blocks(request.handle, request.layout)
        end = request.first_block + request.num_blocks if request.num_blocks else len(block_ids)
        if request.first_block >= len(block_ids) or end > len(block_ids):
            raise InvalidRequestError(
                f"block range [{request.first_block}, {end}) is outside the request's {len(block_ids)} blocks"
            )
        ids, per_chunk = block_ids[request.first_block : end], max(1, request.blocks_per_chunk)
        async for chunk in stream_blocks(self.cache, ids, per_chunk, offset=request.first_block):
            yield chunk

    async def NixlHandshake(  # noqa: N802
        self, request: kv_pb2.NixlHandshakeRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.NixlHandshakeResponse:
        if self.nixl is None:
            raise KVRelayError("this prefill worker does not serve NIXL (start it with the nixl backend enabled)")
        block_ids = await self.source.pinned_blocks(request.handle, request.layout)
        return self.nixl.handshake(request.handle.request_id, block_ids, self.source.lease_seconds)

    async def Release(  # noqa: N802
        self, request: kv_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.ReleaseResponse:
        released = await self.source.release(request.handle)
        if self.nixl is not None:
            self.nixl.done(request.handle.request_id)
        return kv_pb2.ReleaseResponse(released=released)


class KVDispatch(kv_pb2_grpc.KVServiceServicer):
    """The worker's KVService: each call goes to the service of the model whose KV its handle names.
    KV lives only in a loaded model, so this never loads one, and a model with KV pinned for a pull
    is never evicted."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    async def PullBlocks(  # noqa: N802
        self, request: kv_pb2.PullBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.BlockChunk]:
        async with self.pool.use(request.handle.layout.model_id, load=False) as model:
            async for chunk in model.services.kv.PullBlocks(request, context):
                yield chunk

    async def NixlHandshake(  # noqa: N802
        self, request: kv_pb2.NixlHandshakeRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.NixlHandshakeResponse:
        async with self.pool.use(request.handle.layout.model_id, load=False) as model:
            return await model.services.kv.NixlHandshake(request, context)

    async def Release(  # noqa: N802
        self, request: kv_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.ReleaseResponse:
        async with self.pool.use(request.handle.layout.model_id, load=False) as model:
            return await model.services.kv.Release(request, context)
