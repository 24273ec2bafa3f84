"""KV over a gRPC stream: the prefill side copies pinned blocks into chunks of a few MB, the decode
side writes each chunk into its reserved blocks as it arrives."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator

import torch

from common.kv.cache import KVCache
from common.kv.layout import KVLayout
from common.rpc import kv_pb2, kv_pb2_grpc, types_pb2
from common.rpc.channels import ChannelPool
from common.rpc.convert import layout_to_proto
from common.tracing.grpc_context import outgoing_metadata
from kvtransfer.base import TransferResult, check_handle

CHUNK_BYTES = 4 * 2**20
LANES = 2


def blocks_per_chunk(layout: KVLayout) -> int:
    return max(1, CHUNK_BYTES // layout.block_bytes)


async def stream_blocks(
    cache: KVCache, block_ids: list[int], per_chunk: int, offset: int = 0
) -> AsyncIterator[kv_pb2.BlockChunk]:
    """Prefill side: the blocks as chunks. Copies run in a thread, one chunk ahead of the one being
    sent, so copying overlaps sending; the blocks are pinned, so the engine does not touch them."""

    def copy(start: int) -> kv_pb2.BlockChunk:
        ids = block_ids[start : start + per_chunk]
        data = cache.read_blocks(ids).numpy().tobytes()
        return kv_pb2.BlockChunk(first_block=offset + start, num_blocks=len(ids), data=data)

    starts = list(range(0, len(block_ids), per_chunk))
    pending = asyncio.ensure_future(asyncio.to_thread(copy, starts[0])) if starts else None
    for i in range(len(starts)):
        chunk = await pending
        pending = asyncio.ensure_future(asyncio.to_thread(copy, starts[i + 1])) if i + 1 < len(starts) else None
        yield chunk


class GrpcTransferClient:
    backend = "grpc"

    def __init__(self, cache: KVCache, channels: ChannelPool) -> None:
        self.cache = cache
        self.channels = channels

    async def pull(self, handle: types_pb2.KVHandle, dst_block_ids: list[int], timeout: float) -> TransferResult:
        layout = self.cache.layout
        check_handle(layout, handle, dst_block_ids)
        t0 = time.perf_counter()
        n = len(dst_block_ids)
        # One stream per lane over its own connection: a single gRPC stream tops out well below
        # memory bandwidth in Python, two in parallel get closer to it.
        per_lane = -(-n // LANES)
        ranges = [(s, min(per_lane, n - s)) for s in range(0, n, per_lane)]
        counts = await asyncio.gather(
            *(self._pull_range(handle, dst_block_ids, lane, s, k, timeout) for lane, (s, k) in enumerate(ranges))
        )
        received = sum(counts)
        if received != n:
            raise ConnectionError(f"KV stream ended after {received} of {n} blocks")
        return TransferResult(self.backend, received, received * layout.block_bytes, time.perf_counter() - t0)

    async def _pull_range(
        self, handle: types_pb2.KVHandle, dst_block_ids: list[int], lane: int, first: int, count: int, timeout: float
    ) -> int:
        layout = self.cache.layout
        stub = kv_pb2_grpc.KVServiceStub(self.channels.get(handle.transfer_endpoint, lane))
        block_shape = tuple(self.cache.tensor.shape[1:])
        dtype = self.cache.tensor.dtype
        call = stub.PullBlocks(
            kv_pb2.PullBlocksRequest(
                handle=handle,
                layout=layout_to_proto(layout),
                blocks_per_chunk=blocks_per_chunk(layout),
                first_block=first,
                num_blocks=count,
            ),
            timeout=timeout,
            metadata=outgoing_metadata(),
        )
        received = 0
        writing: asyncio.Future | None = None
        async for chunk in call:
            if writing is not None:
                await writing
            # Write in a thread while the next chunk arrives. The bytes are only read, so a
            # read-only view is safe (torch warns about read-only buffers in general).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(chunk.data, dtype=dtype).view(chunk.num_blocks, *block_shape)
            dst = dst_block_ids[chunk.first_block : chunk.first_block + chunk.num_blocks]
            writing = asyncio.ensure_future(asyncio.to_thread(self.cache.write_blocks, dst, data))
            received += chunk.num_blocks
        if writing is not None:
            await writing
        return received
