"""W3C trace context over gRPC metadata: clients inject it into every call, servers continue it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

_tracer = trace.get_tracer("kvrelay.grpc")
UNTRACED_SERVICES = ("kvrelay.v1.WorkerService/",)  # health polls and event streams: noise


def outgoing_metadata(span: trace.Span | None = None) -> tuple[tuple[str, str], ...]:
    """The trace context as gRPC metadata: of `span` when given (a span that is not the current one,
    as in an async generator, which must not attach a context across its yields), else the current one."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None)
    return tuple(carrier.items())


@contextlib.contextmanager
def server_span(method: str, context: grpc.aio.ServicerContext) -> Iterator[trace.Span | None]:
    """A SERVER span for one incoming call, child of the caller's span if it sent one."""
    if method.lstrip("/").startswith(UNTRACED_SERVICES):
        yield None
        return
    carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    service, _, name = method.lstrip("/").rpartition("/")
    with _tracer.start_as_current_span(
        f"{service.rsplit('.', 1)[-1]}/{name}",
        context=propagate.extract(carrier),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def mark_error(code: grpc.StatusCode, message: str) -> None:
    span = trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))
