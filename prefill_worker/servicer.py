"""The prefill role: PrefillService (run the prompt, pin its blocks) and KVService (hand them over)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from common.engine.async_engine import AsyncEngine
from common.errors import InvalidRequestError
from common.rpc import kv_pb2, kv_pb2_grpc, prefill_pb2, prefill_pb2_grpc, types_pb2
from common.rpc.convert import layout_from_proto, layout_to_proto, params_from_proto
from common.serving.metrics import EXPORT, PREFILL, QUEUE, REQUESTS, TTFT
from common.serving.phases import PhaseTimer
from common.serving.worker_servicer import WorkerIdentity
from kvtransfer.grpc_backend import stream_blocks
from kvtransfer.nixl_backend import NixlKVServer


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, engine: AsyncEngine, identity: WorkerIdentity) -> None:
        self.engine = engine
        self.identity = identity

    async def Prefill(  # noqa: N802
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        timer = PhaseTimer()
        params = params_from_proto(request.params)
        out = None
        async for o in self.engine.generate(request.request_id, list(request.token_ids), params, prefill_only=True):
            out = o
        if out is None or out.error or not out.new_token_ids:
            REQUESTS.labels("prefill", "Prefill", "error").inc()
            raise RuntimeError(out.error if out and out.error else "prefill produced no token")
        TTFT.labels("prefill").observe(time.monotonic() - timer.start)
        # queue: to admission (the wait for the engine thread included); prefill: the compute.
        QUEUE.labels("prefill").observe(timer.until("queue", out.admitted_at))
        PREFILL.labels("prefill").observe(timer.until("prefill", out.first_token_at))
        REQUESTS.labels("prefill", "Prefill", "ok").inc()
        span = trace.get_current_span()
        span.set_attributes(
            {
                "kvrelay.request_id": request.request_id,
                "gen_ai.usage.input_tokens": out.num_prompt_tokens,
                "kvrelay.prefix.actual_cached_tokens": out.num_cached_tokens,
            }
        )
        resp = prefill_pb2.PrefillResponse(
            first_token=out.new_token_ids[0],
            finished=out.finished,
            finish_reason=out.finish_reason or "",
            usage=types_pb2.Usage(
                prompt_tokens=out.num_prompt_tokens, completion_tokens=1, cached_tokens=out.num_cached_tokens
            ),
            text=out.text or "",
        )
        if out.pinned:
            export = await self.engine.export_kv(request.request_id)
            resp.handle.CopyFrom(
                types_pb2.KVHandle(
                    worker_id=self.identity.worker_id,
                    request_id=request.request_id,
                    block_ids=export.block_ids,
                    layout=layout_to_proto(export.layout),
                    transfer_endpoint=self.identity.address,
                    lease_deadline_unix=time.time() + (export.lease_deadline - time.monotonic()),
                    num_tokens=export.num_tokens,
                )
            )
        # export: from the token to the reply (the step's other work, delivery, pinning the blocks)
        EXPORT.observe(timer.until("export"))
        timer.record(span)
        return resp


class KVServicer(kv_pb2_grpc.KVServiceServicer):
    def __init__(self, engine: AsyncEngine, nixl: NixlKVServer | None) -> None:
        self.engine = engine
        self.nixl = nixl

    async def _pinned_blocks(self, request_id: str, layout: types_pb2.KVLayout) -> list[int]:
        self.engine.engine.layout.check_compatible(layout_from_proto(layout))
        export = await self.engine.extend_lease(request_id)
        return export.block_ids

    async def PullBlocks(  # noqa: N802
        self, request: kv_pb2.PullBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.BlockChunk]:
        block_ids = await self._pinned_blocks(request.request_id, request.layout)
        end = request.first_block + request.num_blocks if request.num_blocks else len(block_ids)
        if request.first_block >= len(block_ids) or end > len(block_ids):
            raise InvalidRequestError(
                f"block range [{request.first_block}, {end}) is outside the request's {len(block_ids)} blocks"
            )
        async for chunk in stream_blocks(
            self.engine.engine.cache,
            block_ids[request.first_block : end],
            max(1, request.blocks_per_chunk),
            offset=request.first_block,
        ):
            yield chunk

    async def NixlHandshake(  # noqa: N802
        self, request: kv_pb2.NixlHandshakeRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.NixlHandshakeResponse:
        if self.nixl is None:
            raise InvalidRequestError("this prefill worker does not serve NIXL (the nixl package is missing)")
        block_ids = await self._pinned_blocks(request.request_id, request.layout)
        return self.nixl.handshake(request.request_id, block_ids, self.engine.engine.config.lease_seconds)

    async def Release(  # noqa: N802
        self, request: kv_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.ReleaseResponse:
        if self.nixl is not None:
            self.nixl.done(request.request_id)
        return kv_pb2.ReleaseResponse(released=await self.engine.release(request.request_id))
