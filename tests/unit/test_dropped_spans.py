"""Spans lost on the way out are counted, so a trace with a hole in it is explained."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from common.tracing.dropped import DROPPED, CountingBatchProcessor


class _Down(SpanExporter):
    def export(self, spans):  # noqa: ANN001, ANN201
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


def test_a_failed_export_counts_its_spans_as_dropped():
    before = DROPPED.labels("export_failed")._value.get()
    provider = TracerProvider()
    provider.add_span_processor(CountingBatchProcessor(_Down(), schedule_delay_millis=10))
    tracer = provider.get_tracer("test")
    for _ in range(3):
        tracer.start_span("s").end()
    provider.force_flush()
    assert DROPPED.labels("export_failed")._value.get() - before == 3
    provider.shutdown()
