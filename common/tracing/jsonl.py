"""Spans as JSON lines: one file per process in a shared directory, read back by `kvrelay trace`.

Each line: {"trace_id", "span_id", "parent_id", "name", "service", "kind", "start", "end",
"status", "attributes", "events"}; ids are lowercase hex, times are unix seconds.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def span_record(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "service": span.resource.attributes.get("service.name", "unknown"),
        "kind": span.kind.name.lower(),
        "start": span.start_time / 1e9,
        "end": (span.end_time or span.start_time) / 1e9,
        "status": span.status.status_code.name.lower(),
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time": e.timestamp / 1e9, "attributes": dict(e.attributes or {})} for e in span.events
        ],
    }


class JsonlSpanExporter(SpanExporter):
    def __init__(self, directory: str, service: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"{service}-{os.getpid()}.jsonl")
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def read_spans(directory: str | Path) -> Iterator[dict]:
    """Every span in the directory's files; a torn last line (a process mid-write) is skipped."""
    for path in sorted(Path(directory).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
