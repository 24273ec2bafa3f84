"""The prefill role: PrefillService runs the prompt, pins its blocks and answers with a signed
handle to them (KVService, in kvtransfer/service.py, hands them over)."""

from __future__ import annotations

import time

import grpc
from opentelemetry import trace

from common.engine.async_engine import AsyncEngine
from common.rpc import prefill_pb2, prefill_pb2_grpc, types_pb2
from common.rpc.convert import params_from_proto
from common.serving.metrics import EXPORT, PREFILL, QUEUE, REQUESTS, TTFT
from common.serving.model_pool import ModelPool
from common.serving.phases import PhaseTimer
from kvtransfer.source import EngineKVSource


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, engine: AsyncEngine, source: EngineKVSource) -> None:
        self.engine = engine
        self.source = source

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
            resp.handle.CopyFrom(await self.source.issue(request.request_id, request.token_ids))
        # export: from the token to the reply (the step's other work, delivery, pinning the blocks)
        EXPORT.observe(timer.until("export"))
        timer.record(span)
        return resp


class PrefillDispatch(prefill_pb2_grpc.PrefillServiceServicer):
    """The worker's PrefillService: each call goes to its model's servicer (loaded first if need be)."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    async def Prefill(  # noqa: N802
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        async with self.pool.use(request.model) as model:
            return await model.services.prefill.Prefill(request, context)
