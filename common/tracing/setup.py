"""Set up OpenTelemetry for one process: its identity (resource), a sampler, W3C trace-context
propagation, and an exporter (OTLP when an endpoint is configured, else JSON lines).

The standard variables are honoured: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` override
the resource kvrelay builds (service.name, service.instance.id = the worker id, service.version),
and `OTEL_TRACES_SAMPLER` (with `OTEL_TRACES_SAMPLER_ARG`) replaces kvrelay's sampler.
"""

from __future__ import annotations

import logging
import os
import socket
from importlib.metadata import PackageNotFoundError, version

from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased

from common.tracing.dropped import CountingBatchProcessor
from common.tracing.jsonl import JsonlSpanExporter
from common.tracing.sampling import EdgeSampler
from common.tracing.settings import TracingSettings
from common.tracing.tail import TailKeeper

log = logging.getLogger(__name__)
_provider: TracerProvider | None = None
_capture_content = False


def kvrelay_version() -> str:
    try:
        return version("kvrelay")
    except PackageNotFoundError:
        return "unknown"


def init_tracing(
    service: str,
    settings: TracingSettings,
    instance_id: str | None = None,
    attributes: dict | None = None,
    edge: bool = False,
) -> None:
    """Idempotent per process. With tracing disabled, spans are non-recording and cost next to nothing.
    `edge`: this process is where requests enter (the gateway), so it makes the sampling decision."""
    global _provider, _capture_content
    if _provider is not None:
        return
    _capture_content = settings.enabled and settings.capture_content
    resource = _resource(service, instance_id, attributes or {})
    tail = edge and settings.enabled and settings.keep_errors_and_slow and settings.sample_ratio < 1.0
    _provider = TracerProvider(sampler=_sampler(settings, edge, tail), resource=resource)
    if settings.enabled:
        exported = resource.attributes.get("service.name", service)
        processor: SpanProcessor = CountingBatchProcessor(_exporter(str(exported), settings), 1000)
        if tail:
            processor = TailKeeper(processor, settings.slow_request_s)
        _provider.add_span_processor(processor)
    trace.set_tracer_provider(_provider)


def _resource(service: str, instance_id: str | None, attributes: dict) -> Resource:
    ours = {
        "service.name": service,
        "service.namespace": "kvrelay",
        "service.version": kvrelay_version(),
        "service.instance.id": instance_id or f"{socket.gethostname()}-{os.getpid()}",
        **attributes,
    }
    # The environment wins: an operator's OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES are the truth.
    return Resource.create(ours).merge(OTELResourceDetector().detect())


def _sampler(settings: TracingSettings, edge: bool, tail: bool) -> Sampler | None:
    if not settings.enabled:
        return ALWAYS_OFF
    if os.environ.get("OTEL_TRACES_SAMPLER"):
        return None  # the SDK builds the one the environment names
    if edge:
        return EdgeSampler(settings.sample_ratio, settings.trust_client_sampling, record_unsampled=tail)
    return ParentBased(TraceIdRatioBased(settings.sample_ratio))


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
