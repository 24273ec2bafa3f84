"""The gateway's SERVER span and outcome for each generation request.

A plain ASGI middleware (outermost), so the span covers a streamed body to its last byte. It
continues a client's W3C `traceparent` when it sends a valid one (a malformed one is ignored: a new
trace starts); whether the client's sampled flag is obeyed is a tracing setting (see
`common/tracing/sampling.py`). Every response carries the trace id in `X-Trace-Id`.

When the response is over, the request's `RequestRecord` becomes:
- `kvrelay_gateway_requests_total{model, outcome, finish_reason}` and the phase histogram;
- the root span's `kvrelay.outcome`, `error.type`, `kvrelay.phase.*_seconds` (which add up to the
  span's duration), `http.route`, and status ERROR with a description for server-side failures
  (a 4xx is the client's doing: per HTTP semantic conventions it does not make a SERVER span ERROR).
"""

from __future__ import annotations

import asyncio

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import PHASES, REQUESTS
from gateway.request_record import OK, SERVER_ERROR, SERVER_SIDE, RequestRecord, outcome_of

_tracer = trace.get_tracer("kvrelay.gateway")
TRACED_PREFIX = "/v1/"  # generation requests; health, readiness, metrics and model-list polls are not traced


class RequestObserver:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(TRACED_PREFIX):
            await self.app(scope, receive, send)
            return
        record = RequestRecord()
        scope.setdefault("state", {})["record"] = record
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        span = _tracer.start_span(
            method,  # renamed to "METHOD /route" once routing matched (never the raw path: unbounded)
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        trace_id = f"{span.get_span_context().trace_id:032x}".encode()
        status = 500  # what the client sees if the app fails before answering

        async def send_with_trace_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-trace-id", trace_id)]
            await send(message)

        # Entered and left in this one task: spans opened deeper (in other tasks) never attach a context.
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            try:
                await self.app(scope, receive, send_with_trace_id)
            except asyncio.CancelledError:
                record.cancel()
                raise
            except Exception as e:
                record.fail(500, "internal_error", type(e).__name__)
                raise
            finally:
                _finish(span, record, scope, status)


def _finish(span: trace.Span, record: RequestRecord, scope: Scope, status: int) -> None:
    if record.outcome is None:
        if status < 400:
            # Answered 2xx but nobody said how it ended: a body cut short by a failure we did not see.
            record.fail(500, "incomplete", "the response ended without an outcome")
        else:
            record.fail(status, None, f"HTTP {status}")
    outcome = record.outcome or SERVER_ERROR
    finish = record.finish_reason or "none"
    REQUESTS.labels(record.model, outcome, finish).inc()
    phases = record.clock.close()
    for phase, seconds in phases.items():
        if seconds > 0:
            PHASES.labels(phase).observe(seconds)
    route = getattr(scope.get("route"), "path", None)
    if route:
        span.update_name(f"{scope['method']} {route}")
    attrs: dict = {
        "http.response.status_code": status,
        "kvrelay.outcome": outcome,
        **{f"kvrelay.phase.{p}_seconds": s for p, s in phases.items()},
    }
    if route:
        attrs["http.route"] = route
    if record.finish_reason:
        attrs["gen_ai.response.finish_reasons"] = (record.finish_reason,)
    if outcome != OK:
        attrs["error.type"] = record.error_type or outcome
    span.set_attributes(attrs)
    if outcome in SERVER_SIDE or outcome_of(status) in SERVER_SIDE:
        span.set_status(Status(StatusCode.ERROR, f"{record.error_type or outcome}: {record.error_message or ''}"))
    span.end()
    record.ended()
