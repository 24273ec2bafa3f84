"""The gateway's sampling: a client's traceparent does not force recording unless trusted; below
ratio 1, failed and slow requests keep their gateway spans; the standard OTEL_* variables win."""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

from common.tracing.sampling import EdgeSampler
from common.tracing.settings import TracingSettings
from common.tracing.setup import _resource, _sampler
from common.tracing.tail import TailKeeper

CLIENT = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, TraceFlags(TraceFlags.SAMPLED))


def _provider(sampler, slow_s: float | None = None):  # noqa: ANN001, ANN202
    exported = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exported)
    if slow_s is not None:
        processor = TailKeeper(processor, slow_s)
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(processor)
    return provider.get_tracer("test"), exported


def _under_client(tracer):  # noqa: ANN001, ANN202
    return tracer.start_span("root", context=trace.set_span_in_context(NonRecordingSpan(CLIENT)))


def test_a_client_cannot_force_sampling_unless_trusted():
    tracer, exported = _provider(EdgeSampler(0.0, trust_client=False, record_unsampled=False))
    span = _under_client(tracer)
    assert span.get_span_context().trace_id == CLIENT.trace_id  # still the client's trace
    assert not span.get_span_context().trace_flags.sampled
    span.end()
    assert exported.get_finished_spans() == ()

    tracer, exported = _provider(EdgeSampler(0.0, trust_client=True, record_unsampled=False))
    span = _under_client(tracer)
    assert span.get_span_context().trace_flags.sampled
    span.end()
    assert len(exported.get_finished_spans()) == 1


def _request(tracer, fail: bool = False, sleep: float = 0.0) -> None:  # noqa: ANN001
    root = tracer.start_span("POST /v1/chat/completions")
    with trace.use_span(root, end_on_exit=False):
        with tracer.start_as_current_span("schedule"):
            pass
        child = tracer.start_span("decode")
        time.sleep(sleep)
        child.end()
    if fail:
        root.set_status(Status(StatusCode.ERROR, "worker_lost: decode worker died"))
    root.end()


def test_below_ratio_one_failed_and_slow_requests_are_kept_whole_and_the_rest_dropped():
    tracer, exported = _provider(EdgeSampler(0.0, trust_client=False, record_unsampled=True), slow_s=0.05)
    _request(tracer)
    assert exported.get_finished_spans() == ()  # an ordinary request: not picked, not kept
    _request(tracer, fail=True)
    kept = exported.get_finished_spans()
    assert sorted(s.name for s in kept) == ["POST /v1/chat/completions", "decode", "schedule"]
    assert all(s.context.trace_flags.sampled for s in kept)
    assert len({s.context.trace_id for s in kept}) == 1
    exported.clear()
    _request(tracer, sleep=0.06)
    assert len(exported.get_finished_spans()) == 3  # slow: kept too


def test_the_ratio_still_picks_traces_and_children_follow_the_root():
    tracer, exported = _provider(EdgeSampler(1.0, trust_client=False, record_unsampled=True), slow_s=60)
    _request(tracer)
    assert len(exported.get_finished_spans()) == 3


def test_the_standard_environment_variables_win(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-edge")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.instance.id=pod-7")
    attrs = _resource("kvrelay-gateway", "gw-1", {}).attributes
    assert attrs["service.name"] == "llm-edge" and attrs["service.instance.id"] == "pod-7"
    assert attrs["deployment.environment"] == "prod" and attrs["service.version"]

    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    attrs = _resource("kvrelay-decode", "decode-3", {}).attributes
    assert attrs["service.name"] == "kvrelay-decode" and attrs["service.instance.id"] == "decode-3"

    settings = TracingSettings(sample_ratio=0.5)
    assert isinstance(_sampler(settings, edge=True, tail=True), EdgeSampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert _sampler(settings, edge=True, tail=True) is None  # the SDK builds the one the environment names


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_disabled_tracing_records_nothing(ratio):
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    assert _sampler(TracingSettings(enabled=False, sample_ratio=ratio), edge=True, tail=False) is ALWAYS_OFF
