"""The span files: everything a span says survives the round trip (status and why, events, links,
resource, scope), files are private to their owner, and they rotate by size without losing spans."""

from __future__ import annotations

import os
import stat

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, Status, StatusCode
from typer.testing import CliRunner

from common.tracing.jsonl import JsonlSpanExporter, read_spans
from kvrelay.trace_cli import trace_app


def _tracer(exporter: JsonlSpanExporter) -> trace.Tracer:
    provider = TracerProvider(
        resource=Resource.create({"service.name": "kvrelay-gateway", "service.instance.id": "gw-1"})
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("kvrelay.gateway", "0.1.0")


def test_a_span_round_trips_whole_and_the_file_is_private(tmp_path):
    directory = tmp_path / "traces"
    exporter = JsonlSpanExporter(str(directory), "kvrelay-gateway")
    tracer = _tracer(exporter)
    other = tracer.start_span("earlier")
    other.end()
    with tracer.start_as_current_span(
        "POST /v1/chat/completions",
        kind=trace.SpanKind.SERVER,
        links=[Link(other.get_span_context(), {"why": "retry"})],
    ) as span:
        span.add_event("migrate", {"kvrelay.migrate.reason": "worker_lost"})
        span.set_attributes({"kvrelay.outcome": "worker_lost", "http.response.status_code": 200})
        span.set_status(Status(StatusCode.ERROR, "worker_lost: decode worker died"))
    exporter.shutdown()
    (rec,) = [s for s in read_spans(directory) if s["name"].startswith("POST")]
    assert rec["status"] == "error" and rec["status_description"] == "worker_lost: decode worker died"
    assert rec["kind"] == "server" and rec["events"][0]["name"] == "migrate"
    assert rec["links"] == [
        {
            "trace_id": f"{other.get_span_context().trace_id:032x}",
            "span_id": f"{other.get_span_context().span_id:016x}",
            "attributes": {"why": "retry"},
        }
    ]
    assert rec["resource"]["service.instance.id"] == "gw-1" and rec["scope"] == {
        "name": "kvrelay.gateway",
        "version": "0.1.0",
    }
    assert stat.S_IMODE(os.stat(exporter.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_files_rotate_by_size_and_the_reader_reads_them_all(tmp_path):
    exporter = JsonlSpanExporter(str(tmp_path), "kvrelay-decode", max_bytes=2_000, keep=2)
    tracer = _tracer(exporter)
    for i in range(60):
        tracer.start_span(f"s{i}").end()
    exporter.shutdown()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and names[1].endswith(".jsonl.1") and names[2].endswith(".jsonl.2"), names
    kept = {s["name"] for s in read_spans(tmp_path)}
    assert "s59" in kept and len(kept) < 60  # the newest are kept, the oldest rotated away
    assert all(os.path.getsize(tmp_path / n) < 4_000 for n in names)


def test_trace_ls_shows_outcomes_and_filters_by_them(tmp_path):
    exporter = JsonlSpanExporter(str(tmp_path), "kvrelay-gateway")
    tracer = _tracer(exporter)
    for status, outcome in ((200, "ok"), (400, "client_error"), (429, None), (502, "worker_lost")):
        with tracer.start_as_current_span("POST /v1/completions") as span:
            span.set_attribute("http.response.status_code", status)
            if outcome:
                span.set_attribute("kvrelay.outcome", outcome)
    exporter.shutdown()
    run = CliRunner().invoke(trace_app, ["ls", "--dir", str(tmp_path)])
    assert run.exit_code == 0, run.output
    for outcome in ("ok", "client_error", "overloaded", "worker_lost"):
        assert outcome in run.output
    lost = CliRunner().invoke(trace_app, ["ls", "--dir", str(tmp_path), "--outcome", "worker_lost", "--json"])
    assert len(lost.output.strip().splitlines()) == 1 and '"outcome": "worker_lost"' in lost.output
