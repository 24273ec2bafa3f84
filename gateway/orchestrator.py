"""One request through the workers: prefill → first token to the client → decode (KV pulled by the
decode worker) → the rest. With no prefill worker up, the decode worker prefills locally."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common.engine.sampling import SamplingParams
from common.kv.block_hash import block_hashes
from common.rpc import decode_pb2, decode_pb2_grpc, kv_pb2, kv_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from common.rpc.channels import ChannelPool
from common.rpc.convert import params_to_proto
from common.settings import GatewaySettings
from common.tracing.grpc_context import outgoing_metadata
from gateway.errors import APIError, from_grpc
from gateway.metrics import CHOSEN, DECISIONS, PREFIX_TOKENS
from gateway.registry import WorkerRegistry
from gateway.scheduling.scheduler import NoCandidateError, Scheduler
from gateway.scheduling.types import RequestInfo, ScoredCandidate

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)


@dataclass
class Delta:
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    text: str | None = None  # the worker's final text, cut at a stop string
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Route:
    mode: str  # "disaggregated" | "colocated" (the decode worker prefills)
    prefill: str | None
    decode: str
    reason: str = "pd"  # the P/D decider's reason
    predicted_cached_tokens: int = 0
    workers: tuple[str, ...] = ()  # worker ids charged with this request's in-flight tokens
    transfer: dict = field(default_factory=dict)


class Orchestrator:
    def __init__(
        self, registry: WorkerRegistry, channels: ChannelPool, settings: GatewaySettings, scheduler: Scheduler
    ) -> None:
        self.registry = registry
        self.channels = channels
        self.settings = settings
        self.scheduler = scheduler
        self.inflight: Counter[str] = Counter()  # worker id -> prompt tokens sent, not yet finished
        self._background: set[asyncio.Task] = set()

    def route(self, prompt_ids: list[int]) -> Route:
        with _tracer.start_as_current_span("schedule") as span:
            route = self._route(prompt_ids, span)
            span.set_attributes(
                {
                    "kvrelay.schedule.mode": route.mode,
                    "kvrelay.schedule.reason": route.reason,
                    "kvrelay.schedule.prefill": route.prefill or "",
                    "kvrelay.schedule.decode": route.decode,
                    "kvrelay.prefix.predicted_cached_tokens": route.predicted_cached_tokens,
                }
            )
            return route

    def _route(self, prompt_ids: list[int], span: trace.Span) -> Route:
        ref = self.registry.reference_layout()
        bs = ref.block_size if ref is not None else 16
        req = RequestInfo(len(prompt_ids), tuple(block_hashes(prompt_ids, bs)), bs)
        errors = self.registry.layout_errors()
        pools: dict[str, list] = {"prefill": [], "decode": []}
        for w in self.registry.workers.values():
            pools[w.role].append(w.candidate(errors.get(w.address), self.inflight[w.worker_id]))
        try:
            sched = self.scheduler.schedule(req, pools["prefill"], pools["decode"])
        except NoCandidateError as e:
            span.set_status(Status(StatusCode.ERROR, str(e)))
            raise APIError(503, str(e), "server_error", code="no_workers") from e
        if span.is_recording():
            span.set_attributes(
                {
                    "kvrelay.schedule.prefill_candidates": _scores(sched.prefill_scored),
                    "kvrelay.schedule.decode_candidates": _scores(sched.decode_scored),
                    "kvrelay.schedule.load_only": sched.load_only,
                }
            )
        DECISIONS.labels("pd" if sched.prefill else "decode_only", sched.decision.reason).inc()
        decode = sched.decode.candidate
        CHOSEN.labels("decode", decode.worker_id).inc()
        if sched.prefill is not None:
            CHOSEN.labels("prefill", sched.prefill.candidate.worker_id).inc()
        if sched.prefill is None:
            return Route(
                "colocated",
                None,
                decode.address,
                sched.decision.reason,
                sched.predicted_cached_tokens,
                (decode.worker_id,),
            )
        prefill = sched.prefill.candidate
        return Route(
            "disaggregated",
            prefill.address,
            decode.address,
            sched.decision.reason,
            sched.predicted_cached_tokens,
            (prefill.worker_id, decode.worker_id),
        )

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, route: Route
    ) -> AsyncIterator[Delta]:
        for w in route.workers:
            self.inflight[w] += len(prompt_ids)
        actual = None
        try:
            async for delta in self._generate(request_id, prompt_ids, params, route):
                if actual is None:
                    actual = delta.cached_tokens
                    PREFIX_TOKENS.labels("predicted").inc(route.predicted_cached_tokens)
                    PREFIX_TOKENS.labels("actual").inc(actual)
                yield delta
        finally:
            for w in route.workers:
                self.inflight[w] -= len(prompt_ids)
                if self.inflight[w] <= 0:
                    del self.inflight[w]

    async def _generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, route: Route
    ) -> AsyncIterator[Delta]:
        wire = params_to_proto(params)
        if route.prefill is None:
            with _client_span("decode", route.decode) as span:
                stub = decode_pb2_grpc.DecodeServiceStub(self.channels.get(route.decode))
                call = stub.Generate(
                    decode_pb2.GenerateRequest(request_id=request_id, token_ids=prompt_ids, params=wire),
                    timeout=self.settings.request_timeout_s,
                    metadata=outgoing_metadata(),
                )
                async for delta in self._stream(call, route.decode, route, params, span):
                    yield delta
            return

        with _client_span("prefill", route.prefill) as span:
            prefill = prefill_pb2_grpc.PrefillServiceStub(self.channels.get(route.prefill))
            try:
                resp = await prefill.Prefill(
                    prefill_pb2.PrefillRequest(request_id=request_id, token_ids=prompt_ids, params=wire),
                    timeout=self.settings.prefill_timeout_s,
                    metadata=outgoing_metadata(),
                )
            except grpc.aio.AioRpcError as e:
                span.set_status(Status(StatusCode.ERROR, e.code().name))
                raise from_grpc(e, route.prefill) from e
            span.set_attribute("kvrelay.prefix.actual_cached_tokens", resp.usage.cached_tokens)
        cached = resp.usage.cached_tokens
        yield Delta(
            [resp.first_token],
            resp.finished,
            resp.finish_reason or None,
            resp.text if resp.finished else None,
            resp.usage.prompt_tokens,
            1,
            cached,
        )
        if resp.finished:
            return
        handle = resp.handle
        finished = False
        try:
            with _client_span("decode", route.decode) as span:
                stub = decode_pb2_grpc.DecodeServiceStub(self.channels.get(route.decode))
                call = stub.Decode(
                    decode_pb2.DecodeRequest(
                        request_id=request_id,
                        handle=handle,
                        prompt_token_ids=prompt_ids,
                        first_token=resp.first_token,
                        params=wire,
                        transfer=self.settings.transfer,
                    ),
                    timeout=self.settings.request_timeout_s,
                    metadata=outgoing_metadata(),
                )
                async for delta in self._stream(call, route.decode, route, params, span):
                    delta.cached_tokens = cached
                    finished = delta.finished
                    yield delta
        finally:
            if not finished:
                # Decode failed or the client went away: unpin the prefill KV now, not at lease expiry.
                # Idempotent: a no-op if the decode worker had already released it.
                self._spawn(self._release(route.prefill, handle.request_id))

    async def _stream(
        self, call: grpc.aio.UnaryStreamCall, worker: str, route: Route, params: SamplingParams, span: trace.Span
    ) -> AsyncIterator[Delta]:
        done = False
        try:
            async for chunk in call:
                if chunk.HasField("transfer"):
                    t = chunk.transfer
                    route.transfer = {"backend": t.backend, "blocks": t.blocks, "bytes": t.bytes, "seconds": t.seconds}
                    span.add_event("kv_received", {f"kvrelay.transfer.{k}": v for k, v in route.transfer.items()})
                done = chunk.finished
                yield Delta(
                    list(chunk.token_ids),
                    chunk.finished,
                    chunk.finish_reason or None,
                    chunk.text if chunk.finished and params.stop else None,
                    chunk.usage.prompt_tokens,
                    chunk.usage.completion_tokens,
                    chunk.usage.cached_tokens,
                )
        except grpc.aio.AioRpcError as e:
            span.set_status(Status(StatusCode.ERROR, e.code().name))
            raise from_grpc(e, worker) from e
        finally:
            if not done:
                call.cancel()  # the client went away: the worker aborts and frees the blocks

    async def _release(self, address: str, request_id: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            stub = kv_pb2_grpc.KVServiceStub(self.channels.get(address))
            await stub.Release(kv_pb2.ReleaseRequest(request_id=request_id), timeout=5.0, metadata=outgoing_metadata())

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _client_span(stage: str, address: str) -> contextlib.AbstractContextManager[trace.Span]:
    return _tracer.start_as_current_span(
        stage,
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "server.address": address, "kvrelay.stage": stage},
        record_exception=False,
    )


def _scores(scored: list[ScoredCandidate]) -> tuple[str, ...]:
    """One "worker=total (scorer=value, ...)" string per candidate, best first."""
    out = []
    for s in sorted(scored, key=lambda s: -s.total):
        parts = ", ".join(f"{k}={v:.2f}" for k, v in s.scores.items())
        out.append(f"{s.candidate.worker_id}={s.total:.3f} ({parts})")
    return tuple(out)
