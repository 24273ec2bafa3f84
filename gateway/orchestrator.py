"""One attempt at a request over one route: prefill → first token → decode (KV pulled by the
decode worker) → the rest; or, with no prefill worker chosen, the decode worker prefills locally.

An attempt yields `Delta`s and ends in one of two ways: a delta with `finished`, or a
`WorkerFailure` naming the stage and worker that failed. Deciding what to do about a failure
(retry elsewhere, migrate the stream, give up) belongs to `gateway.supervisor`, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common.engine.sampling import SamplingParams
from common.kv.block_hash import block_hashes, model_salt
from common.rpc import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc, types_pb2
from common.rpc.channels import ChannelPool
from common.rpc.convert import params_to_proto
from common.settings import GatewaySettings
from common.tracing.grpc_context import outgoing_metadata
from gateway.errors import APIError, WorkerFailure, from_grpc
from gateway.inflight import Charge, InflightLedger
from gateway.metrics import CHOSEN, DECISIONS
from gateway.registry import WorkerRegistry
from gateway.scheduling.scheduler import NoCandidateError, NoCapacityError, Scheduler
from gateway.scheduling.shortlist import shortlist
from gateway.scheduling.types import ANYWHERE, Placement, RequestInfo, ScoredCandidate
from kvtransfer.release import release

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
    transfer: dict | None = None  # set on the first decode delta of a disaggregated attempt


@dataclass(frozen=True)
class Route:
    mode: str  # "disaggregated" | "colocated" (the decode worker prefills)
    prefill: str | None
    decode: str
    reason: str = "pd"  # the P/D decider's reason
    predicted_cached_tokens: int = 0
    prefill_id: str | None = None
    decode_id: str = ""

    @property
    def workers(self) -> tuple[str, ...]:
        """Worker ids charged with this request's in-flight tokens."""
        return (self.prefill_id, self.decode_id) if self.prefill_id else (self.decode_id,)


class Orchestrator:
    def __init__(
        self, registry: WorkerRegistry, channels: ChannelPool, settings: GatewaySettings, scheduler: Scheduler
    ) -> None:
        self.registry = registry
        self.channels = channels
        self.settings = settings
        self.scheduler = scheduler
        self.ledger = InflightLedger()
        self._rng = random.Random()
        self._background: set[asyncio.Task] = set()

    def route(
        self,
        prompt_ids: list[int],
        avoid: frozenset[str] = frozenset(),
        cache_salt: str = "",
        placement: Placement = ANYWHERE,
    ) -> Route:
        """Choose workers for this prompt where `placement` allows, never one of `avoid` (addresses
        that just failed it)."""
        with _tracer.start_as_current_span("schedule") as span:
            route = self._route(prompt_ids, avoid, span, cache_salt, placement)
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

    def _route(
        self, prompt_ids: list[int], avoid: frozenset[str], span: trace.Span, cache_salt: str, placement: Placement
    ) -> Route:
        model = placement.model or self.registry.model_id
        bs = self.registry.block_size(model)
        req = RequestInfo(len(prompt_ids), tuple(block_hashes(prompt_ids, bs, model_salt(model, cache_salt))), bs)
        pools: dict[str, list] = {"prefill": [], "decode": []}
        for role, pool in pools.items():
            view = self.registry.pool(role, model)
            keep = shortlist(view.by_load, req.block_hashes, self.scheduler.index, self._rng)
            for w, worker_id in zip(view.states, view.ids, strict=True):
                if w.address in avoid or (keep is not None and worker_id not in keep):
                    continue
                tokens = self.ledger.tokens[worker_id]
                if role == "decode":
                    candidate = w.candidate(
                        placement,
                        model,
                        view.layout_errors.get(w.address),
                        tokens,
                        self.ledger.pending_blocks(worker_id, w.last_seen),
                        self.ledger.streams(worker_id),
                        self.settings.admission.max_streams_per_decode_worker,
                    )
                else:
                    candidate = w.candidate(placement, model, view.layout_errors.get(w.address), tokens)
                pool.append(candidate)
        try:
            sched = self.scheduler.schedule(req, pools["prefill"], pools["decode"])
        except NoCapacityError as e:
            span.set_status(Status(StatusCode.ERROR, str(e)))
            raise APIError(
                429, str(e), "server_overloaded", code=e.code, retry_after=self.settings.admission.retry_after_s
            ) from e
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
        prefill = sched.prefill.candidate if sched.prefill is not None else None
        if prefill is not None:
            CHOSEN.labels("prefill", prefill.worker_id).inc()
        return Route(
            "disaggregated" if prefill else "colocated",
            prefill.address if prefill else None,
            decode.address,
            sched.decision.reason,
            sched.predicted_cached_tokens,
            prefill.worker_id if prefill else None,
            decode.worker_id,
        )

    async def attempt(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        route: Route,
        placement: Placement = ANYWHERE,
    ) -> AsyncIterator[Delta]:
        """Serve the request once over `route`. Raises WorkerFailure when a worker fails it."""
        model = placement.model
        block_size = self.registry.block_size(model)
        blocks = -(-(len(prompt_ids) + 1) // block_size)
        charge = self.ledger.charge(route.workers, len(prompt_ids), route.decode_id, blocks)
        try:
            if route.prefill is None:
                deltas = self._colocated(request_id, prompt_ids, params, route, charge, model)
            else:
                deltas = self._disaggregated(request_id, prompt_ids, params, route, charge, model)
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield delta
        finally:
            self.ledger.settle(charge)

    async def _colocated(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, route: Route, charge: Charge, model: str
    ) -> AsyncIterator[Delta]:
        with _client_span("decode", route.decode) as span:
            stub = decode_pb2_grpc.DecodeServiceStub(self.channels.get(route.decode))
            call = stub.Generate(
                decode_pb2.GenerateRequest(
                    request_id=request_id, token_ids=prompt_ids, params=params_to_proto(params), model=model
                ),
                timeout=self.settings.request_timeout_s,
                metadata=outgoing_metadata(span),
            )
            async for delta in self._stream(call, route.decode, "decode", params, span, charge):
                yield delta

    async def _disaggregated(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, route: Route, charge: Charge, model: str
    ) -> AsyncIterator[Delta]:
        assert route.prefill is not None
        wire = params_to_proto(params)
        with _client_span("prefill", route.prefill) as span:
            prefill = prefill_pb2_grpc.PrefillServiceStub(self.channels.get(route.prefill))
            try:
                resp = await prefill.Prefill(
                    prefill_pb2.PrefillRequest(request_id=request_id, token_ids=prompt_ids, params=wire, model=model),
                    timeout=self.settings.prefill_timeout_s,
                    metadata=outgoing_metadata(span),
                )
            except grpc.aio.AioRpcError as e:
                span.set_status(Status(StatusCode.ERROR, e.code().name))
                raise from_grpc(e, route.prefill, "prefill") from e
            span.set_attribute("kvrelay.prefix.actual_cached_tokens", resp.usage.cached_tokens)
        cached = resp.usage.cached_tokens
        first = Delta(
            [resp.first_token],
            resp.finished,
            resp.finish_reason or None,
            resp.text if resp.finished else None,
            resp.usage.prompt_tokens,
            1,
            cached,
        )
        if resp.finished:
            yield first
            return
        handle = resp.handle
        released = False
        try:
            # Inside the try: a client that leaves right after the first token must unpin the KV too.
            yield first
            with _client_span("decode", route.decode) as span:
                stub = decode_pb2_grpc.DecodeServiceStub(self.channels.get(route.decode))
                call = stub.Decode(
                    decode_pb2.DecodeRequest(
                        request_id=request_id,
                        handle=handle,
                        prompt_token_ids=prompt_ids,
                        first_token=resp.first_token,
                        params=wire,
                        model=model,
                    ),
                    timeout=self.settings.request_timeout_s,
                    metadata=outgoing_metadata(span),
                )
                try:
                    async for delta in self._stream(call, route.decode, "decode", params, span, charge):
                        released = True  # the decode worker released the prefill KV before its first chunk
                        delta.cached_tokens = cached
                        yield delta
                except WorkerFailure as e:
                    if e.code == "kv_transfer_failed":  # the prefill side failed the pull, not the decode worker
                        e.worker, e.stage = route.prefill, "transfer"
                    raise
        finally:
            if not released:
                # Decode failed or the client went away: unpin the prefill KV now, not at lease expiry.
                # Idempotent: a no-op if the decode worker had already released it.
                self._spawn(self._release(handle))

    async def _stream(
        self,
        call: grpc.aio.UnaryStreamCall,
        worker: str,
        stage: str,
        params: SamplingParams,
        span: trace.Span,
        charge: Charge,
    ) -> AsyncIterator[Delta]:
        """The worker's chunks as deltas. A gap longer than stall_timeout_s between two chunks is a
        stalled worker: the call is cancelled and the attempt fails (the supervisor migrates). The
        first chunk may wait behind a queue and a prefill (or a KV pull): it gets prefill_timeout_s."""
        done = False
        chunks = aiter(call)
        wait = self.settings.prefill_timeout_s
        try:
            while not done:
                try:
                    async with asyncio.timeout(wait):
                        chunk = await anext(chunks)
                    wait = self.settings.migration.stall_timeout_s
                except StopAsyncIteration:
                    raise WorkerFailure(
                        502, f"worker {worker} ended the stream without finishing", worker, stage, "worker_lost"
                    ) from None
                except TimeoutError:
                    span.set_status(Status(StatusCode.ERROR, "stalled"))
                    raise WorkerFailure(
                        504,
                        f"worker {worker} sent no token for {wait:.0f}s",
                        worker,
                        stage,
                        "worker_stalled",
                    ) from None
                self.ledger.reserved(charge)
                transfer = None
                if chunk.HasField("transfer"):
                    t = chunk.transfer
                    transfer = {"backend": t.backend, "blocks": t.blocks, "bytes": t.bytes, "seconds": t.seconds}
                    span.add_event("kv_received", {f"kvrelay.transfer.{k}": v for k, v in transfer.items()})
                done = chunk.finished
                yield Delta(
                    list(chunk.token_ids),
                    chunk.finished,
                    chunk.finish_reason or None,
                    chunk.text if chunk.finished and params.stop else None,
                    chunk.usage.prompt_tokens,
                    chunk.usage.completion_tokens,
                    chunk.usage.cached_tokens,
                    transfer,
                )
        except grpc.aio.AioRpcError as e:
            span.set_status(Status(StatusCode.ERROR, e.code().name))
            raise from_grpc(e, worker, stage) from e
        finally:
            if not done:
                call.cancel()  # the client went away or the worker failed: it aborts and frees the blocks

    async def _release(self, handle: types_pb2.KVHandle) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await release(self.channels, handle)

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


@contextlib.contextmanager
def _client_span(stage: str, address: str) -> Iterator[trace.Span]:
    """A CLIENT span for one call to a worker, child of the current span but never made current
    itself: it lives in an async generator, whose steps run in different tasks (the first token is
    awaited in one, the stream is sent in another), and a context attached in one task cannot be
    detached in another. Calls carry it explicitly (`outgoing_metadata(span)`)."""
    host, _, port = address.rpartition(":")
    span = _tracer.start_span(
        stage,
        kind=SpanKind.CLIENT,
        attributes={
            "rpc.system": "grpc",
            "server.address": host or address,
            "server.port": int(port) if port.isdigit() else 0,
            "kvrelay.stage": stage,
        },
    )
    try:
        yield span
    except Exception as e:
        if span.is_recording() and span.status.status_code is StatusCode.UNSET:  # type: ignore[attr-defined]
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
        raise
    finally:
        span.end()


def _scores(scored: list[ScoredCandidate]) -> tuple[str, ...]:
    """One "worker=total (scorer=value, ...)" string per candidate, best first."""
    out = []
    for s in sorted(scored, key=lambda s: -s.total):
        parts = ", ".join(f"{k}={v:.2f}" for k, v in s.scores.items())
        out.append(f"{s.candidate.worker_id}={s.total:.3f} ({parts})")
    return tuple(out)
