"""The tail of the gateway's sampling decision: traces the ratio did not pick are held in memory
(recorded, not sampled) until their root span ends, then exported if the request failed on the
server's side or was slow, and forgotten otherwise. See `common/tracing/sampling.py`."""

from __future__ import annotations

import threading
from collections import OrderedDict

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanContext, StatusCode, TraceFlags

_MAX_OPEN_TRACES = 10_000  # bound on memory: the oldest open trace is forgotten first


class TailKeeper(SpanProcessor):
    def __init__(self, downstream: SpanProcessor, slow_s: float) -> None:
        self.downstream = downstream
        self.slow_s = slow_s
        self._open: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.downstream.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None or ctx.trace_flags.sampled:
            self.downstream.on_end(span)
            return
        local_root = span.parent is None or span.parent.is_remote
        with self._lock:
            spans = self._open.pop(ctx.trace_id, [])
            spans.append(span)
            if not local_root:
                self._open[ctx.trace_id] = spans
                while len(self._open) > _MAX_OPEN_TRACES:
                    self._open.popitem(last=False)
                return
        if self._keep(span):
            for s in spans:
                self.downstream.on_end(_as_sampled(s))

    def _keep(self, root: ReadableSpan) -> bool:
        if root.status.status_code is StatusCode.ERROR:
            return True
        duration = ((root.end_time or 0) - (root.start_time or 0)) / 1e9
        return duration >= self.slow_s

    def shutdown(self) -> None:
        self.downstream.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.downstream.force_flush(timeout_millis)


def _as_sampled(span: ReadableSpan) -> ReadableSpan:
    c = span.context
    assert c is not None
    ctx = SpanContext(c.trace_id, c.span_id, c.is_remote, TraceFlags(TraceFlags.SAMPLED), c.trace_state)
    return ReadableSpan(
        name=span.name,
        context=ctx,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes,
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
