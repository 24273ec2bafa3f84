"""The source side of a KV transfer, in one place: the prefill worker issues handles for the
blocks it pinned, and every transfer (a gRPC pull, a NIXL handshake, a release) goes through
`KVSource`, which verifies the handle before it hands out a block or lets one go. The transfer
backends only move bytes; the rules live here."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from common.engine.async_engine import AsyncEngine
from common.errors import PermissionDeniedError
from common.rpc import types_pb2
from common.rpc.convert import layout_from_proto, layout_to_proto
from kvtransfer.handles import HandleSigner, prompt_digest


class KVSource(Protocol):
    async def pinned_blocks(self, handle: types_pb2.KVHandle, layout: types_pb2.KVLayout) -> list[int]:
        """The handle's blocks, its lease extended for the pull; raises unless the handle holds."""
        ...

    async def release(self, handle: types_pb2.KVHandle) -> bool:
        """Unpin the handle's blocks. False if they were no longer pinned."""
        ...

    @property
    def lease_seconds(self) -> float: ...


class EngineKVSource:
    def __init__(self, engine: AsyncEngine, signer: HandleSigner, worker_id: str, endpoint: str) -> None:
        self.engine = engine
        self.signer = signer
        self.worker_id = worker_id
        self.endpoint = endpoint

    @property
    def lease_seconds(self) -> float:
        return self.engine.lease_seconds

    async def issue(self, request_id: str, prompt_token_ids: Sequence[int]) -> types_pb2.KVHandle:
        """A signed handle for a request whose prefill just pinned its blocks."""
        export = await self.engine.export_kv(request_id)
        handle = types_pb2.KVHandle(
            worker_id=self.worker_id,
            request_id=request_id,
            block_ids=export.block_ids,
            layout=layout_to_proto(export.layout),
            transfer_endpoint=self.endpoint,
            lease_deadline_unix=time.time() + (export.lease_deadline - time.monotonic()),
            num_tokens=export.num_tokens,
            prompt_digest=prompt_digest(prompt_token_ids),
        )
        return self.signer.sign(handle)

    async def pinned_blocks(self, handle: types_pb2.KVHandle, layout: types_pb2.KVLayout) -> list[int]:
        self.signer.verify(handle)
        self.engine.layout.check_compatible(layout_from_proto(layout))
        export = await self.engine.extend_lease(handle.request_id)
        if list(export.block_ids) != list(handle.block_ids):
            # The signature holds, so this handle was ours; a request id reused after an abort
            # must still not reach blocks it was not issued for.
            raise PermissionDeniedError(f"the KV handle of request {handle.request_id!r} no longer names its blocks")
        return list(export.block_ids)

    async def release(self, handle: types_pb2.KVHandle) -> bool:
        self.signer.verify(handle, check_deadline=False)
        return await self.engine.release(handle.request_id)
