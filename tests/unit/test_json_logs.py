"""Log lines are JSON objects that lead to their trace: trace_id and span_id inside a traced
request, none outside, and exceptions kept in the line."""

from __future__ import annotations

import io
import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from common.logs import JsonFormatter, TextFormatter, configure_logging


def _line(formatter: logging.Formatter, emit) -> str:  # noqa: ANN001
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger("kvrelay.test.json")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    try:
        emit(log)
    finally:
        log.removeHandler(handler)
    return stream.getvalue().strip()


def test_json_lines_carry_the_trace_inside_a_span_and_not_outside():
    tracer = TracerProvider().get_tracer("test")
    outside = json.loads(_line(JsonFormatter(), lambda log: log.warning("worker %s is slow", "decode-1")))
    assert outside["message"] == "worker decode-1 is slow" and outside["level"] == "WARNING"
    assert outside["time"].endswith("Z") and "trace_id" not in outside
    with tracer.start_as_current_span("request") as span:
        inside = json.loads(_line(JsonFormatter(), lambda log: log.info("migrating")))
        ctx = span.get_span_context()
    assert inside["trace_id"] == f"{ctx.trace_id:032x}" and inside["span_id"] == f"{ctx.span_id:016x}"
    assert set(inside) == {"time", "level", "logger", "message", "trace_id", "span_id"}


def test_an_exception_stays_in_its_line():
    def emit(log: logging.Logger) -> None:
        try:
            raise RuntimeError("step failed")
        except RuntimeError:
            log.exception("engine step failed")

    line = _line(JsonFormatter(), emit)
    assert "\n" not in line
    rec = json.loads(line)
    assert rec["level"] == "ERROR" and "RuntimeError: step failed" in rec["exception"]


def test_text_lines_name_the_trace_too_and_configuring_twice_adds_one_handler():
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request"):
        assert " trace_id=" in _line(TextFormatter(), lambda log: log.info("hello"))
    root = logging.getLogger()
    before = len(root.handlers)
    configure_logging("warning", "json")
    configure_logging("warning", "text")
    try:
        assert len(root.handlers) == before + 1
    finally:
        for h in [h for h in root.handlers if getattr(h, "_kvrelay_handler", False)]:
            root.removeHandler(h)
