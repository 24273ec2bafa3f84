"""Logging for kvrelay's processes: JSON lines (what log pipelines ingest) or text (for a terminal).

Each JSON line: {"time", "level", "logger", "message"} plus "exception" when there is one, and
"trace_id" / "span_id" when the line was written inside a traced request, so a log line leads to
its trace (`kvrelay trace show <trace_id>`). Nothing else of the record is written: arguments that
could hold request content never reach the line except through the formatted message, and kvrelay
never formats prompt text into a message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

from opentelemetry import trace

LogFormat = Literal["json", "text"]
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_kvrelay_handler"


def _trace_ids() -> tuple[str, str] | None:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        line = {
            "time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        ids = _trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = _trace_ids()
        return f"{text} trace_id={ids[0]} span_id={ids[1]}" if ids is not None else text


def default_format() -> LogFormat:
    """Text on a terminal, JSON lines otherwise (containers, files, pipes)."""
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(level: str, fmt: LogFormat | None = None) -> None:
    """Idempotent: one kvrelay handler on the root logger (and uvicorn's loggers use it too)."""
    fmt = fmt or default_format()
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
