"""Run a prepared request and answer it as OpenAI does: one JSON body, or SSE chunks ending in
`data: [DONE]`. Chat and text completions differ only in how a chunk and a body are shaped.

Every accepted request ends in tokens or an explicit error: before the first token, errors get
their HTTP status (429 with Retry-After when over capacity); after it, a stream that cannot be
continued ends with an SSE event carrying an OpenAI error object, never a silent stop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from starlette.requests import Request

from common.tracing.setup import capture_content
from gateway.access import response_headers
from gateway.admission import Admission
from gateway.client_gone import unless_client_leaves
from gateway.detokenizer import StreamDetokenizer
from gateway.errors import APIError
from gateway.metrics import E2E, OUTPUT_TOKENS, PROMPT_TOKENS, REJECTED, ROUTED, RUNNING, TOKEN_GAP, TPOT, TTFT
from gateway.orchestrator import Delta
from gateway.prepare import Prepared
from gateway.request_record import RequestRecord
from gateway.scheduling.types import Placement
from gateway.supervisor import Outcome, Supervisor
from gateway.token_gaps import TokenGaps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    kind: str  # "chat" | "text"

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def chunk_choice(self, text: str | None, finish: str | None, first: bool) -> dict:
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def body_choice(self, text: str, finish: str | None) -> dict:
        if self.kind == "text":
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }


def _usage(last: Delta) -> dict:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
    }


class Responder:
    def __init__(
        self,
        supervisor: Supervisor,
        admission: Admission,
        routing_headers: bool = False,
    ) -> None:
        self.routing_headers = routing_headers
        self.supervisor = supervisor
        self.admission = admission
        self.gaps = TokenGaps()
        TOKEN_GAP.set_function(self.gaps.max_gap)

    async def respond(
        self, shape: Shape, request_id: str, prep: Prepared, request: Request
    ) -> JSONResponse | StreamingResponse:
        span = trace.get_current_span()
        record = _record_of(request)
        record.model = prep.model_name
        self._trace_request(span, shape, request_id, prep)
        t0 = time.perf_counter()
        outcome = Outcome(clock=record.clock)
        outcome.clock.enter("admission")
        # Wait for the first token before answering, so that early failures get a proper HTTP status.
        try:
            with self.admission.ticket(len(prep.prompt_ids), prep.priority):
                deltas = self._timed(
                    self.supervisor.serve(
                        request_id, prep.prompt_ids, prep.params, outcome, Placement(prep.model, prep.pool)
                    ),
                    outcome,
                    t0,
                    prep,
                    span,
                    record,
                )
                first = await unless_client_leaves(anext(deltas), request)
        except APIError as e:
            if e.status == 429:
                REJECTED.labels(prep.priority, e.code or "").inc()
            raise
        route = outcome.first_route
        assert route is not None
        ROUTED.labels(route.mode).inc()
        headers = {"X-Request-Id": request_id, **response_headers(request)}
        if self.routing_headers:
            headers |= {
                "X-Kvrelay-Mode": route.mode,
                "X-Kvrelay-Decision": route.reason,
                "X-Kvrelay-Prefill": route.prefill_id or "",
                "X-Kvrelay-Decode": route.decode_id,
                "X-Kvrelay-Predicted-Cached-Tokens": str(route.predicted_cached_tokens),
            }
        if prep.stream:
            return StreamingResponse(
                self._sse(shape, request_id, prep, first, deltas, span, record),
                media_type="text/event-stream",
                headers=headers,
            )
        ids, last = await unless_client_leaves(_collect(first, deltas), request)
        detok = StreamDetokenizer(prep.tokenizer, prep.params.stop)
        text = detok.push(ids) + detok.finish(last.text)
        self._trace_output(span, text, last.finish_reason)
        record.succeed(last.finish_reason)
        body = {
            "id": request_id,
            "object": shape.object,
            "created": int(time.time()),
            "model": prep.model_name,
            "choices": [shape.body_choice(text, last.finish_reason)],
            "usage": _usage(last),
        }
        if prep.return_token_ids:
            body["choices"][0]["token_ids"] = ids
        return JSONResponse(body, headers=headers)

    async def _sse(
        self,
        shape: Shape,
        request_id: str,
        prep: Prepared,
        first: Delta,
        rest: AsyncIterator[Delta],
        span: trace.Span,
        record: RequestRecord,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        detok = StreamDetokenizer(prep.tokenizer, prep.params.stop)

        def event(choices: list[dict], usage: dict | None = None) -> str:
            obj = {
                "id": request_id,
                "object": f"{shape.object}.chunk" if shape.kind == "chat" else shape.object,
                "created": created,
                "model": prep.model_name,
                "choices": choices,
            }
            if prep.include_usage:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        if shape.kind == "chat":
            yield event([shape.chunk_choice("", None, first=True)])
        last = first
        sent = [] if capture_content() else None
        try:
            async with aclosing(rest):
                async for d in _achain(first, rest):
                    last = d
                    text = detok.push(d.token_ids)
                    if d.finished:
                        text += detok.finish(d.text)
                    if sent is not None:
                        sent.append(text)
                    if not (d.finished or text or prep.return_token_ids):
                        continue
                    choice = shape.chunk_choice(text, d.finish_reason if d.finished else None, first=False)
                    if prep.return_token_ids:
                        choice["token_ids"] = d.token_ids
                    yield event([choice])
        except APIError as e:
            # The stream cannot be continued (the retry and migration budget is spent): say so in the
            # stream, where the client's SDK raises it, and close without [DONE].
            log.warning("stream %s failed after it started: %s", request_id, e.message)
            record.fail(e.status, e.code, e.message)
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        except BaseException:
            record.cancel()  # the client left mid-stream (or stopped reading): Starlette closed us
            raise
        if sent is not None:
            self._trace_output(span, "".join(sent), last.finish_reason)
        record.succeed(last.finish_reason)
        if prep.include_usage:
            yield event([], _usage(last))
        yield "data: [DONE]\n\n"

    def _trace_request(self, span: trace.Span, shape: Shape, request_id: str, prep: Prepared) -> None:
        p = prep.params
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat" if shape.kind == "chat" else "text_completion",
                "gen_ai.provider.name": "kvrelay",
                "gen_ai.request.model": prep.model_name,
                "gen_ai.response.model": prep.model,
                "gen_ai.response.id": request_id,
                "gen_ai.request.max_tokens": p.max_tokens,
                "gen_ai.request.temperature": p.temperature,
                "gen_ai.request.top_p": p.top_p,
                "gen_ai.usage.input_tokens": len(prep.prompt_ids),
                "kvrelay.request_id": request_id,
                "kvrelay.stream": prep.stream,
                "kvrelay.priority": prep.priority,
                "kvrelay.workload_class": prep.workload_class,
            }
        )
        if capture_content():
            messages = prep.input_messages or [{"role": "user", "content": prep.tokenizer.decode(prep.prompt_ids)}]
            span.set_attribute(
                "gen_ai.input.messages",
                json.dumps(
                    [{"role": m["role"], "parts": [{"type": "text", "content": m["content"]}]} for m in messages]
                ),
            )

    @staticmethod
    def _trace_output(span: trace.Span, text: str, finish_reason: str | None) -> None:
        if capture_content():
            message = {"role": "assistant", "parts": [{"type": "text", "content": text}]}
            span.set_attribute("gen_ai.output.messages", json.dumps([{**message, "finish_reason": finish_reason}]))

    async def _timed(
        self,
        deltas: AsyncIterator[Delta],
        outcome: Outcome,
        t0: float,
        prep: Prepared,
        span: trace.Span,
        record: RequestRecord,
    ) -> AsyncIterator[Delta]:
        """Metrics and span attributes of one request, as its tokens pass."""
        RUNNING.inc()
        gap = self.gaps.open()
        first_at = None
        ids: list[int] = []
        last: Delta | None = None
        model = prep.model_name
        try:
            async with aclosing(deltas):
                async for d in deltas:
                    self.gaps.tick(gap)
                    if first_at is None:
                        first_at = time.perf_counter()
                        TTFT.labels(model, _mode(outcome)).observe(first_at - t0)
                        record.ttft_s = first_at - t0
                        span.add_event("first_token", {"kvrelay.ttft_seconds": first_at - t0})
                    ids += d.token_ids
                    last = d
                    yield d
            outcome.clock.enter("respond")
            end = time.perf_counter()
            mode = _mode(outcome)
            E2E.labels(model, mode).observe(end - t0)
            PROMPT_TOKENS.labels(model).inc(len(prep.prompt_ids))
            OUTPUT_TOKENS.labels(model).inc(len(ids))
            tpot = (end - first_at) / (len(ids) - 1) if first_at is not None and len(ids) > 1 else None
            if tpot is not None:
                TPOT.labels(model, mode).observe(tpot)
                record.tpot_s = tpot
            if last is not None:
                span.set_attributes(_attributes(outcome, last, len(ids), tpot))
        finally:
            # A request that got no token consumed nothing a budget should pay for.
            record.tokens_used = len(prep.prompt_ids) + len(ids) if first_at is not None else 0
            self.gaps.close(gap)
            RUNNING.dec()


def _mode(outcome: Outcome) -> str:
    return outcome.route.mode if outcome.route else "unknown"


def _attributes(outcome: Outcome, last: Delta, output_tokens: int, tpot: float | None) -> dict:
    route = outcome.first_route
    attrs = {
        "gen_ai.usage.output_tokens": output_tokens,
        "gen_ai.response.finish_reasons": (last.finish_reason or "unknown",),
        "kvrelay.mode": _mode(outcome),
        "kvrelay.prefix.predicted_cached_tokens": route.predicted_cached_tokens if route else 0,
        "kvrelay.prefix.actual_cached_tokens": last.cached_tokens,
        "gen_ai.usage.cache_read.input_tokens": last.cached_tokens,
        "kvrelay.tpot_seconds": tpot or 0.0,
        "kvrelay.attempts": outcome.attempts,
        "kvrelay.migrations": len(outcome.migrations),
    }
    for k, v in outcome.transfer.items():
        attrs[f"kvrelay.transfer.{k}"] = v
    return attrs


def _record_of(request: Request) -> RequestRecord:
    record = getattr(request.state, "record", None)
    return record if record is not None else RequestRecord()  # outside the observer (unit tests)


async def _collect(first: Delta, rest: AsyncIterator[Delta]) -> tuple[list[int], Delta]:
    ids = list(first.token_ids)
    last = first
    async with aclosing(rest):
        async for d in rest:
            ids += d.token_ids
            last = d
    return ids, last


async def _achain(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    async for d in rest:
        yield d
