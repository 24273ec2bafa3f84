"""Run a prepared request and answer it as OpenAI does: one JSON body, or SSE chunks ending in
`data: [DONE]`. Chat and text completions differ only in how a chunk and a body are shaped."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace

from common.tracing.setup import capture_content
from gateway.detokenizer import StreamDetokenizer
from gateway.errors import APIError
from gateway.metrics import E2E, OUTPUT_TOKENS, PROMPT_TOKENS, RETRIES, ROUTED, RUNNING, TPOT, TTFT
from gateway.orchestrator import Delta, Orchestrator, Route
from gateway.prepare import Prepared

log = logging.getLogger(__name__)
_ATTEMPTS = 2


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
    def __init__(self, orchestrator: Orchestrator, tokenizer, model_name: str) -> None:  # noqa: ANN001
        self.orchestrator = orchestrator
        self.tokenizer = tokenizer
        self.model_name = model_name

    async def respond(self, shape: Shape, request_id: str, prep: Prepared) -> JSONResponse | StreamingResponse:
        span = trace.get_current_span()
        self._trace_request(span, shape, request_id, prep)
        t0 = time.perf_counter()
        # Wait for the first token before answering, so that early failures get a proper HTTP status.
        # A worker that went away before producing anything (it stopped, or is draining) costs one
        # retry on another worker, not the client's request.
        for attempt in range(_ATTEMPTS):
            route = self.orchestrator.route(prep.prompt_ids)
            deltas = self._timed(
                self.orchestrator.generate(request_id, prep.prompt_ids, prep.params, route), route, t0, prep, span
            )
            try:
                first = await anext(deltas)
                break
            except APIError as e:
                if not e.retryable or attempt + 1 == _ATTEMPTS:
                    raise
                log.warning("retrying request %s elsewhere: %s", request_id, e.message)
                span.add_event("retry", {"kvrelay.retry.reason": e.code or "", "kvrelay.retry.worker": e.worker or ""})
                RETRIES.inc()
                self.orchestrator.registry.mark_down(e.worker or "", e.message)
        ROUTED.labels(route.mode).inc()
        headers = {
            "X-Request-Id": request_id,
            "X-Kvrelay-Mode": route.mode,
            "X-Kvrelay-Decision": route.reason,
            "X-Kvrelay-Prefill": route.prefill or "",
            "X-Kvrelay-Decode": route.decode,
            "X-Kvrelay-Predicted-Cached-Tokens": str(route.predicted_cached_tokens),
        }
        if prep.stream:
            return StreamingResponse(
                self._sse(shape, request_id, prep, first, deltas), media_type="text/event-stream", headers=headers
            )
        ids = list(first.token_ids)
        last = first
        async for d in deltas:
            ids += d.token_ids
            last = d
        detok = StreamDetokenizer(self.tokenizer, prep.params.stop)
        text = detok.push(ids) + detok.finish(last.text)
        body = {
            "id": request_id,
            "object": shape.object,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [shape.body_choice(text, last.finish_reason)],
            "usage": _usage(last),
        }
        if prep.return_token_ids:
            body["choices"][0]["token_ids"] = ids
        return JSONResponse(body, headers=headers)

    async def _sse(
        self, shape: Shape, request_id: str, prep: Prepared, first: Delta, rest: AsyncIterator[Delta]
    ) -> AsyncIterator[str]:
        created = int(time.time())
        detok = StreamDetokenizer(self.tokenizer, prep.params.stop)

        def event(choices: list[dict], usage: dict | None = None) -> str:
            obj = {
                "id": request_id,
                "object": f"{shape.object}.chunk" if shape.kind == "chat" else shape.object,
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }
            if prep.include_usage:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        if shape.kind == "chat":
            yield event([shape.chunk_choice("", None, first=True)])
        last = first
        async for d in _achain(first, rest):
            last = d
            text = detok.push(d.token_ids)
            if d.finished:
                text += detok.finish(d.text)
            if not (d.finished or text or prep.return_token_ids):
                continue
            choice = shape.chunk_choice(text, d.finish_reason if d.finished else None, first=False)
            if prep.return_token_ids:
                choice["token_ids"] = d.token_ids
            yield event([choice])
        if prep.include_usage:
            yield event([], _usage(last))
        yield "data: [DONE]\n\n"

    def _trace_request(self, span: trace.Span, shape: Shape, request_id: str, prep: Prepared) -> None:
        p = prep.params
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat" if shape.kind == "chat" else "text_completion",
                "gen_ai.request.model": self.model_name,
                "gen_ai.request.max_tokens": p.max_tokens,
                "gen_ai.request.temperature": p.temperature,
                "gen_ai.request.top_p": p.top_p,
                "gen_ai.usage.input_tokens": len(prep.prompt_ids),
                "kvrelay.request_id": request_id,
                "kvrelay.stream": prep.stream,
            }
        )
        if capture_content():
            span.set_attribute("gen_ai.prompt", self.tokenizer.decode(prep.prompt_ids))

    async def _timed(
        self, deltas: AsyncIterator[Delta], route: Route, t0: float, prep: Prepared, span: trace.Span
    ) -> AsyncIterator[Delta]:
        """Metrics and span attributes of one request, as its tokens pass."""
        mode = route.mode
        RUNNING.inc()
        first_at = None
        ids: list[int] = []
        last: Delta | None = None
        try:
            async for d in deltas:
                if first_at is None:
                    first_at = time.perf_counter()
                    TTFT.labels(mode).observe(first_at - t0)
                    span.add_event("first_token", {"kvrelay.ttft_seconds": first_at - t0})
                ids += d.token_ids
                last = d
                yield d
            end = time.perf_counter()
            E2E.labels(mode).observe(end - t0)
            PROMPT_TOKENS.inc(len(prep.prompt_ids))
            OUTPUT_TOKENS.inc(len(ids))
            tpot = (end - first_at) / (len(ids) - 1) if first_at is not None and len(ids) > 1 else None
            if tpot is not None:
                TPOT.labels(mode).observe(tpot)
            if last is not None:
                span.set_attributes(_outcome(route, last, len(ids), tpot))
            if capture_content():
                span.set_attribute("gen_ai.completion", self.tokenizer.decode(ids))
        finally:
            RUNNING.dec()


def _outcome(route: Route, last: Delta, output_tokens: int, tpot: float | None) -> dict:
    attrs = {
        "gen_ai.usage.output_tokens": output_tokens,
        "gen_ai.response.finish_reasons": (last.finish_reason or "unknown",),
        "kvrelay.mode": route.mode,
        "kvrelay.prefix.predicted_cached_tokens": route.predicted_cached_tokens,
        "kvrelay.prefix.actual_cached_tokens": last.cached_tokens,
        "kvrelay.tpot_seconds": tpot or 0.0,
    }
    for k, v in route.transfer.items():
        attrs[f"kvrelay.transfer.{k}"] = v
    return attrs


async def _achain(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    async for d in rest:
        yield d
