"""The gateway's SERVER span for each API request, continuing a client's W3C `traceparent` when it
sends a valid one (a malformed one is ignored: a new trace starts). Every response carries the
trace id in `X-Trace-Id`. A plain ASGI middleware, so the span covers a streamed body to its end."""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_tracer = trace.get_tracer("kvrelay.gateway")
TRACED_PREFIX = "/v1/"  # generation requests; health, readiness, metrics and model-list polls are not traced


class TracingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(TRACED_PREFIX):
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        with _tracer.start_as_current_span(
            f"{method} {path}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        ) as span:
            trace_id = f"{span.get_span_context().trace_id:032x}"

            async def send_with_trace_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"x-trace-id", trace_id.encode())]
                await send(message)

            await self.app(scope, receive, send_with_trace_id)
