"""KV over a gRPC stream: the prefill side copies pinned blocks into chunks of a few MB, the decode
side writes each chunk into its reserved blocks as it arrives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import torch

from common.kv.cache import KVCache
from common.kv.layout import KVLayout
from common.rpc import kv_pb2, kv_pb2_grpc, types_pb2
from common.rpc.channels import ChannelPool
from common.rpc.convert import layout_to_proto
from kvtransfer.base import TransferResult, check_handle

CHUNK_BYTES = 4 * 2**20


def blocks_per_chunk(layout: KVLayout) -> int:
    return max(1, CHUNK_BYTES // layout.block_bytes)


async def stream_blocks(cache: KVCache, block_ids: list[int], per_chunk: int) -> AsyncIterator[kv_pb2.BlockChunk]:
    """Prefill side: the blocks as chunks. The copy runs in a thread so the event loop stays free;
    the blocks are pinned, so the engine does not touch them meanwhile."""
    for start in range(0, len(block_ids), per_chunk):
        ids = block_ids[start : start + per_chunk]
        data = await asyncio.to_thread(lambda ids=ids: cache.read_blocks(ids).numpy().tobytes())
        yield kv_pb2.BlockChunk(first_block=start, num_blocks=len(ids), data=data)


class GrpcTransferClient:
    backend = "grpc"

    def __init__(self, cache: KVCache, channels: ChannelPool) -> None:
        self.cache = cache
        self.channels = channels

    async def pull(self, handle: types_pb2.KVHandle, dst_block_ids: list[int], timeout: float) -> TransferResult:
        layout = self.cache.layout
        check_handle(layout, handle, dst_block_ids)
        stub = kv_pb2_grpc.KVServiceStub(self.channels.get(handle.transfer_endpoint))
        t0 = time.perf_counter()
        received = 0
        block_shape = tuple(self.cache.tensor.shape[1:])
        dtype = self.cache.tensor.dtype
        call = stub.PullBlocks(
            kv_pb2.PullBlocksRequest(
                request_id=handle.request_id, layout=layout_to_proto(layout), blocks_per_chunk=blocks_per_chunk(layout)
            ),
            timeout=timeout,
        )
        async for chunk in call:
            data = torch.frombuffer(bytearray(chunk.data), dtype=dtype).view(chunk.num_blocks, *block_shape)
            dst = dst_block_ids[chunk.first_block : chunk.first_block + chunk.num_blocks]
            self.cache.write_blocks(dst, data)
            received += chunk.num_blocks
        if received != len(dst_block_ids):
            raise ConnectionError(f"KV stream ended after {received} of {len(dst_block_ids)} blocks")
        return TransferResult(self.backend, received, received * layout.block_bytes, time.perf_counter() - t0)
