"""Set up OpenTelemetry for one process: its service name, a parent-based ratio sampler, W3C
trace-context propagation, and an exporter (OTLP when an endpoint is configured, else JSON lines)."""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

from common.tracing.jsonl import JsonlSpanExporter
from common.tracing.settings import TracingSettings

log = logging.getLogger(__name__)
_provider: TracerProvider | None = None
_capture_content = False


def init_tracing(service: str, settings: TracingSettings) -> None:
    """Idempotent per process. With tracing disabled, spans are non-recording and cost next to nothing."""
    global _provider, _capture_content
    if _provider is not None:
        return
    _capture_content = settings.enabled and settings.capture_content
    sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio)) if settings.enabled else ALWAYS_OFF
    _provider = TracerProvider(sampler=sampler, resource=Resource.create({"service.name": service}))
    if settings.enabled:
        exporter = _exporter(service, settings)
        _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    trace.set_tracer_provider(_provider)


def _exporter(service: str, settings: TracingSettings) -> SpanExporter:
    endpoint = settings.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        if settings.otlp_protocol == "http":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

            url = endpoint if endpoint.endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
            log.info("exporting spans over OTLP/HTTP to %s", url)
            return HTTPExporter(endpoint=url)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCExporter

        log.info("exporting spans over OTLP/gRPC to %s", endpoint)
        return GRPCExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    exporter = JsonlSpanExporter(os.path.expanduser(settings.dir), service)
    log.info("writing spans to %s", exporter.path)
    return exporter


def shutdown_tracing() -> None:
    """Flush what is buffered (at exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def capture_content() -> bool:
    """True only when an operator opted in to prompt and completion text in spans."""
    return _capture_content


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
