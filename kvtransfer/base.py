"""The one interface of KV transfer, seen from the decode side.

A client pulls the blocks named by a prefill worker's KVHandle into blocks already reserved in the
local cache, then the caller releases them on the prefill side (`kvtransfer.release`). Both
backends check the layouts before any byte moves; the source side (`kvtransfer.source`) checks
the handle and the layout again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.kv.cache import KVCache
from common.kv.layout import KVLayout
from common.rpc import types_pb2
from common.rpc.channels import ChannelPool
from common.rpc.convert import layout_from_proto


@dataclass(frozen=True)
class TransferResult:
    backend: str
    blocks: int
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


class KVTransferClient(Protocol):
    backend: str

    async def pull(self, handle: types_pb2.KVHandle, dst_block_ids: list[int], timeout: float) -> TransferResult:
        """Fill dst_block_ids (same count and order as handle.block_ids) with the remote blocks."""
        ...


def check_handle(local: KVLayout, handle: types_pb2.KVHandle, dst_block_ids: list[int]) -> None:
    local.check_compatible(layout_from_proto(handle.layout))
    if len(dst_block_ids) != len(handle.block_ids):
        raise ValueError(f"{len(dst_block_ids)} destination blocks for {len(handle.block_ids)} source blocks")


def make_client(kind: str, cache: KVCache, channels: ChannelPool, name: str) -> KVTransferClient:
    if kind == "grpc":
        from kvtransfer.grpc_backend import GrpcTransferClient

        return GrpcTransferClient(cache, channels)
    if kind == "nixl":
        from kvtransfer.nixl_backend import NixlTransferClient

        return NixlTransferClient(cache, channels, name)
    raise ValueError(f"unknown transfer backend {kind!r}; use 'grpc' or 'nixl'")
