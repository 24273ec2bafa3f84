"""The decode role: pull a prefilled request's KV, release it on the prefill side, decode it in the
running batch and stream the tokens. `Generate` prefills locally instead (colocated mode)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from common.engine.async_engine import AsyncEngine
from common.engine.outputs import RequestOutput
from common.errors import CacheFullError, KVRelayError, KVTransferError
from common.kv.layout import KVLayoutMismatchError
from common.rpc import decode_pb2, decode_pb2_grpc, types_pb2
from common.rpc.channels import ChannelPool
from common.rpc.convert import layout_from_proto, params_from_proto
from common.serving.metrics import (
    DECODE,
    KV_CACHE_FULL_WAITS,
    PREFILL,
    QUEUE,
    REQUESTS,
    TRANSFER_BYTES,
    TRANSFER_FAILURES,
    TRANSFER_SECONDS,
    TTFT,
)
from common.serving.model_pool import ModelPool
from common.serving.phases import PhaseTimer
from decode_worker.sources import TrustedSources
from kvtransfer.base import KVTransferClient, TransferResult
from kvtransfer.handles import check_prompt
from kvtransfer.release import release

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
_PULL_MARGIN_S = 1.0  # leave this much of the lease for the pull itself


class LeaseExpiredError(KVTransferError):
    """The prefill side had already freed the blocks when we released them: what we read may be stale."""


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        transfers: dict[str, KVTransferClient],
        transfer: str,
        channels: ChannelPool,
        sources: TrustedSources,
        transfer_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.transfers = transfers
        self.transfer = transfer  # the one backend this worker pulls with (its own setting)
        self.channels = channels
        self.sources = sources
        self.transfer_timeout_s = transfer_timeout_s

    def close(self) -> None:
        """The model is being unloaded: let go of what the transfer clients registered."""
        for client in self.transfers.values():
            close = getattr(client, "close", None)
            if close is not None:
                close()

    async def Decode(  # noqa: N802
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.TokenChunk]:
        handle = request.handle
        kind = self.transfer
        client = self.transfers[kind]
        # The KV must be this prompt's (no importing it under another prompt's block hashes), and its
        # source one this worker trusts (never an address a request merely names).
        check_prompt(handle, request.prompt_token_ids)
        await self.sources.check(handle)
        try:
            self.engine.layout.check_compatible(layout_from_proto(handle.layout))
        except KVLayoutMismatchError:
            TRANSFER_FAILURES.labels(kind, "layout").inc()
            raise
        params = params_from_proto(request.params)
        rid = request.request_id
        span = trace.get_current_span()
        timer = PhaseTimer()
        dst = await self._reserve(request, params, handle.lease_deadline_unix)
        QUEUE.labels("decode").observe(timer.until("queue"))
        span.set_attribute("kvrelay.request_id", rid)
        try:
            result = await self._pull(handle, dst, client, kind, rid)
        except BaseException:
            await self.engine.abort(rid)
            try:
                await release(self.channels, handle, timeout=1.0)
            except Exception:  # best effort: the lease frees the blocks anyway
                log.debug("release after a failed pull of %s failed too", rid)
            raise
        timer.until("transfer")
        TRANSFER_BYTES.labels(kind).observe(result.bytes)
        TRANSFER_SECONDS.labels(kind).observe(result.seconds)
        stats = decode_pb2.TransferStats(
            backend=result.backend, blocks=result.blocks, bytes=result.bytes, seconds=result.seconds
        )
        first = True
        outputs = 0
        async for out in self.engine.decode_imported(rid):
            chunk = _chunk(out)
            if first:
                chunk.transfer.CopyFrom(stats)
                first = False
                timer.until("decode_queue", out.admitted_at)
            outputs = out.num_output_tokens or outputs
            yield chunk
        DECODE.labels("decode").observe(timer.until("decode"))
        REQUESTS.labels("decode", "Decode", "ok").inc()
        timer.record(span)
        span.set_attributes(
            {
                "gen_ai.usage.output_tokens": outputs,
                "kvrelay.tpot_seconds": timer.phases["decode"] / max(1, outputs - 1),
            }
        )

    async def _pull(
        self, handle: types_pb2.KVHandle, dst: list[int], client: KVTransferClient, kind: str, rid: str
    ) -> TransferResult:
        """Read the KV from the prefill worker and release it there, in a CLIENT span (the decode ->
        prefill edge of a service graph). Failures count by reason and become KVTransferError: the
        source failed, not this worker, so the gateway re-prefills elsewhere."""
        host, _, port = handle.transfer_endpoint.rpartition(":")
        with _tracer.start_as_current_span(
            "kv_transfer",
            kind=SpanKind.CLIENT,
            attributes={
                "kvrelay.transfer.backend": kind,
                "kvrelay.transfer.source_worker": handle.worker_id,
                "kvrelay.transfer.blocks": len(dst),
                "server.address": host or handle.transfer_endpoint,
                "server.port": int(port) if port.isdigit() else 0,
            },
        ) as tspan:
            try:
                result = await client.pull(handle, dst, timeout=self.transfer_timeout_s)
            except (grpc.aio.AioRpcError, OSError, TimeoutError, KVRelayError, RuntimeError) as e:
                layout = isinstance(e, grpc.aio.AioRpcError) and e.code() is grpc.StatusCode.FAILED_PRECONDITION
                reason = "layout" if layout or isinstance(e, KVLayoutMismatchError) else "pull"
                TRANSFER_FAILURES.labels(kind, reason).inc()
                raise KVTransferError(f"pulling KV of {rid!r} from {handle.worker_id} failed: {e}") from e
            tspan.set_attributes(
                {
                    "kvrelay.transfer.bytes": result.bytes,
                    "kvrelay.transfer.seconds": result.seconds,
                    "kvrelay.transfer.gbps": result.bytes / max(result.seconds, 1e-9) / 1e9,
                }
            )
            try:
                released = await release(self.channels, handle)
            except grpc.aio.AioRpcError as e:
                TRANSFER_FAILURES.labels(kind, "release").inc()
                raise KVTransferError(f"releasing the KV of {rid!r} on {handle.worker_id} failed: {e}") from e
            if not released:
                TRANSFER_FAILURES.labels(kind, "lease").inc()
                raise LeaseExpiredError(
                    f"the KV lease of {rid!r} expired on {handle.worker_id} before the pull finished; retry"
                )
        return result

    async def _reserve(self, request: decode_pb2.DecodeRequest, params, lease_deadline_unix: float) -> list[int]:  # noqa: ANN001
        """Blocks for the incoming KV. When the cache is momentarily full, wait for running requests to
        free blocks rather than fail, but only while the prefill side's lease leaves time to pull."""
        delay = 0.01
        while True:
            try:
                return await self.engine.begin_import(
                    request.request_id, list(request.prompt_token_ids), request.first_token, params
                )
            except CacheFullError:
                if time.time() + delay + _PULL_MARGIN_S >= lease_deadline_unix:
                    raise
                if delay == 0.01:
                    KV_CACHE_FULL_WAITS.labels("decode").inc()
                    trace.get_current_span().add_event("retry", {"kvrelay.retry.reason": "kv_cache_full"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)

    async def Generate(  # noqa: N802
        self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.TokenChunk]:
        params = params_from_proto(request.params)
        timer = PhaseTimer()
        first = True
        span = trace.get_current_span()
        span.set_attribute("kvrelay.request_id", request.request_id)
        async for out in self.engine.generate(request.request_id, list(request.token_ids), params):
            chunk = _chunk(out)
            if first:
                first = False
                TTFT.labels("decode").observe(time.monotonic() - timer.start)
                QUEUE.labels("decode").observe(timer.until("queue", out.admitted_at))
                PREFILL.labels("decode").observe(timer.until("prefill", out.first_token_at))
                span.add_event("first_token")
                span.set_attribute("kvrelay.prefix.actual_cached_tokens", out.num_cached_tokens)
                # The first chunk says what the prefix cache held, so the gateway can count it at once.
                chunk.usage.prompt_tokens = out.num_prompt_tokens
                chunk.usage.cached_tokens = out.num_cached_tokens
            if out.finished:
                span.set_attribute("gen_ai.usage.output_tokens", out.num_output_tokens)
            yield chunk
        DECODE.labels("decode").observe(timer.until("decode"))
        timer.record(span)
        REQUESTS.labels("decode", "Generate", "ok").inc()


def _chunk(out: RequestOutput) -> decode_pb2.TokenChunk:
    if out.error:
        raise RuntimeError(out.error)
    chunk = decode_pb2.TokenChunk(
        token_ids=out.new_token_ids, finished=out.finished, finish_reason=out.finish_reason or ""
    )
    if out.finished:
        chunk.usage.CopyFrom(
            types_pb2.Usage(
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=out.num_output_tokens,
                cached_tokens=out.num_cached_tokens,
            )
        )
        chunk.text = out.text or ""
    return chunk


class DecodeDispatch(decode_pb2_grpc.DecodeServiceServicer):
    """The worker's DecodeService: each call goes to its model's servicer (loaded first if need be);
    a Decode names its model, or its KV handle does."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    async def Decode(  # noqa: N802
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.TokenChunk]:
        async with self.pool.use(request.model or request.handle.layout.model_id) as model:
            async for chunk in model.services.Decode(request, context):
                yield chunk

    async def Generate(  # noqa: N802
        self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.TokenChunk]:
        async with self.pool.use(request.model) as model:
            async for chunk in model.services.Generate(request, context):
                yield chunk
