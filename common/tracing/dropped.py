"""Spans that never reached their destination, counted: `kvrelay_tracing_spans_dropped_total`.
A span is dropped when the export queue is full (the exporter cannot keep up) or its export
failed (the collector is down, the disk is full). A trace with a hole in it is then explained."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import Counter

DROPPED = Counter(
    "kvrelay_tracing_spans_dropped_total", "Spans lost before export (queue full or export failed)", ["reason"]
)
MAX_QUEUE = 8192


class CountingExporter(SpanExporter):
    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            DROPPED.labels("export_failed").inc(len(spans))
            raise
        if result is not SpanExportResult.SUCCESS:
            DROPPED.labels("export_failed").inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchProcessor(SpanProcessor):
    """A BatchSpanProcessor that counts what its full queue throws away."""

    def __init__(self, exporter: SpanExporter, schedule_delay_millis: float) -> None:
        self.inner = BatchSpanProcessor(
            CountingExporter(exporter), max_queue_size=MAX_QUEUE, schedule_delay_millis=schedule_delay_millis
        )

    def _queue_len(self) -> int:
        # The SDK exposes no drop hook; its queue is a bounded deque that drops the oldest span.
        queue = getattr(getattr(self.inner, "_batch_processor", None), "_queue", None)
        return len(queue) if queue is not None else 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled and self._queue_len() >= MAX_QUEUE:
            DROPPED.labels("queue_full").inc()
        self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)
