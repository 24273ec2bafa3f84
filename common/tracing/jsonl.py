"""Spans as JSON lines: one file per process in a shared directory, read back by `kvrelay trace`.

Each line: {"trace_id", "span_id", "parent_id", "name", "service", "kind", "start", "end",
"status" ("ok" | "error" | "unset"), "status_description", "attributes", "events", "links",
"resource", "scope"}; ids are lowercase hex, times are unix seconds. Files are created 0600 (the
directory 0700): spans can say which requests a process served. A file over `max_bytes` is rotated
(`name.jsonl` → `name.jsonl.1` → ...), keeping `keep` old ones; the reader reads them all.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

MAX_BYTES = 64 * 2**20
KEEP = 3


def span_record(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    parent = span.parent
    scope = span.instrumentation_scope
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
        "status_description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time": e.timestamp / 1e9, "attributes": dict(e.attributes or {})} for e in span.events
        ],
        "links": [
            {
                "trace_id": f"{link.context.trace_id:032x}",
                "span_id": f"{link.context.span_id:016x}",
                "attributes": dict(link.attributes or {}),
            }
            for link in span.links
        ],
        "resource": dict(span.resource.attributes),
        "scope": {"name": scope.name, "version": scope.version} if scope is not None else None,
    }


class JsonlSpanExporter(SpanExporter):
    def __init__(self, directory: str, service: str, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, f"{service}-{os.getpid()}.jsonl")
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._file = self._open()

    def _open(self):  # noqa: ANN202
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            try:
                self._file.write(lines)
                self._file.flush()
                if self._file.tell() >= self.max_bytes:
                    self._rotate()
            except OSError:
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.keep - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        if self.keep > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.remove(self.path)
        self._file = self._open()

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def _span_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".jsonl") or ".jsonl." in p.name)


def read_spans(directory: str | Path) -> Iterator[dict]:
    """Every span in the directory's files, rotated ones included; a torn last line (a process
    mid-write) is skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in _span_files(directory):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
