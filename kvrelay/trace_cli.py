"""`kvrelay trace ls|show`: read the JSON-lines span files and show where a request's time went."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from datetime import datetime

import typer
from rich.console import Console
from rich.text import Text

from common.tracing.jsonl import read_spans
from common.tracing.settings import default_trace_dir

trace_app = typer.Typer(no_args_is_help=True, help="Inspect request traces written by kvrelay's services")
DIR = typer.Option(None, "--dir", help="span files directory (default: $KVRELAY_TRACING__DIR or the state dir)")
_COLOURS = {"kvrelay-gateway": "cyan", "kvrelay-prefill": "magenta", "kvrelay-decode": "green"}
_BAR = 48


def _dir(given: str | None) -> str:
    return given or os.environ.get("KVRELAY_TRACING__DIR") or default_trace_dir()


def load_traces(directory: str) -> dict[str, list[dict]]:
    traces: dict[str, list[dict]] = defaultdict(list)
    for span in read_spans(directory):
        traces[span["trace_id"]].append(span)
    return traces


def roots_of(spans: list[dict]) -> list[dict]:
    """Spans whose parent is not in the trace (the top, or a client's span outside kvrelay)."""
    ids = {s["span_id"] for s in spans}
    return [s for s in spans if s["parent_id"] not in ids]


def tree_order(spans: list[dict]) -> list[tuple[int, dict]]:
    """(depth, span) depth-first, children by start time."""
    children: dict[str | None, list[dict]] = defaultdict(list)
    ids = {s["span_id"] for s in spans}
    for s in spans:
        children[s["parent_id"] if s["parent_id"] in ids else None].append(s)
    out: list[tuple[int, dict]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children[parent], key=lambda s: s["start"]):
            out.append((depth, s))
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return out


def outcome_of(root: dict) -> str:
    """A request's outcome: what the gateway recorded on its root span (kvrelay.outcome), else what
    its HTTP status and span status say."""
    a = root.get("attributes", {})
    if a.get("kvrelay.outcome"):
        return str(a["kvrelay.outcome"])
    status = a.get("http.response.status_code")
    if isinstance(status, int) and status >= 400:
        return "overloaded" if status == 429 else ("client_error" if status < 500 else "server_error")
    return "server_error" if root.get("status") == "error" else "ok"


@trace_app.command("ls")
def ls(
    limit: int = typer.Option(20, help="most recent traces to list"),
    directory: str = DIR,
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    outcome: str = typer.Option(None, help="only requests with this outcome (ok, client_error, worker_lost, ...)"),
) -> None:
    """List recent traces: id, start, route, duration, outcome."""
    rows = []
    for trace_id, spans in load_traces(_dir(directory)).items():
        top = min(roots_of(spans), key=lambda s: s["start"])
        start, end = min(s["start"] for s in spans), max(s["end"] for s in spans)
        status = outcome_of(top)
        if outcome is not None and status != outcome:
            continue
        services = sorted({s["service"] for s in spans})
        rows.append((start, trace_id, top["name"], end - start, status, len(spans), services))
    rows.sort(reverse=True)
    rows = rows[:limit]
    if as_json:
        for start, tid, route, dur, status, n, services in rows:
            typer.echo(json.dumps({"trace_id": tid, "start": start, "route": route, "duration_s": dur,
                                   "outcome": status, "spans": n, "services": services}))  # fmt: skip
        return
    typer.echo(f"{'TRACE ID':32}  {'START':19}  {'DURATION':>11}  {'OUTCOME':12}  {'SPANS':>5}  ROUTE (SERVICES)")
    for start, tid, route, dur, status, n, services in rows:
        when = datetime.fromtimestamp(start).strftime("%Y-%m-%d %H:%M:%S")
        names = ", ".join(s.removeprefix("kvrelay-") for s in services)
        typer.echo(f"{tid:32}  {when:19}  {dur * 1000:8.1f} ms  {status:12}  {n:5d}  {route} ({names})")


def _note(span: dict) -> str:
    a = span["attributes"]
    if "kvrelay.transfer.bytes" in a and span["name"] == "kv_transfer":
        mb = a["kvrelay.transfer.bytes"] / 1e6
        return f"{a['kvrelay.transfer.backend']} {mb:.2f} MB at {a.get('kvrelay.transfer.gbps', 0):.3f} GB/s"
    if span["name"] == "schedule":
        mode, why = a.get("kvrelay.schedule.mode", ""), a.get("kvrelay.schedule.reason", "")
        return f"{mode} ({why}), predicted cached {a.get('kvrelay.prefix.predicted_cached_tokens', 0)}"
    phases = [(k[len("kvrelay.phase.") : -len("_seconds")], v) for k, v in a.items() if k.startswith("kvrelay.phase.")]
    note = ", ".join(f"{name} {v * 1000:.1f} ms" for name, v in phases if v >= 0.0005)
    if span.get("status") == "error" and span.get("status_description"):
        note = f"{note}  ERROR {span['status_description']}".strip()
    return note


@trace_app.command("show")
def show(
    trace_id: str = typer.Argument(..., help="the id from `kvrelay trace ls` or a response's X-Trace-Id"),
    directory: str = DIR,
    as_json: bool = typer.Option(False, "--json", help="the spans as JSON"),
) -> None:
    """Draw one trace as a waterfall: a bar per span on a shared time axis, services coloured."""
    where = _dir(directory)
    spans = load_traces(where).get(trace_id.lower())
    if not spans:
        typer.echo(f"no trace {trace_id!r} in {where}", err=True)
        raise typer.Exit(1)
    ordered = tree_order(spans)
    if as_json:
        typer.echo(json.dumps({"trace_id": trace_id.lower(), "spans": [s for _, s in ordered]}))
        return
    t0 = min(s["start"] for s in spans)
    total = max(max(s["end"] for s in spans) - t0, 1e-9)
    console = Console()
    console.print(f"trace {trace_id}  {total * 1000:.1f} ms  {len(spans)} spans")
    width = max(len("  " * d + s["name"]) for d, s in ordered) + 2
    by_id = {s["span_id"]: s for s in spans}
    for depth, s in ordered:
        colour = _COLOURS.get(s["service"], "white")
        parent = by_id.get(s["parent_id"])
        handoff = parent is not None and parent["service"] != s["service"]  # crossed a process boundary
        lo = int((s["start"] - t0) / total * _BAR)
        hi = max(lo + 1, int(round((s["end"] - t0) / total * _BAR)))
        line = Text(("  " * depth + s["name"]).ljust(width))
        line.append(f"{s['service'].removeprefix('kvrelay-'):8} ", style=colour)
        line.append("↳" if handoff else " ", style="bold yellow")
        line.append(" " * lo + "█" * (hi - lo) + " " * (_BAR - hi), style=colour if s["status"] != "error" else "red")
        line.append(f" {(s['end'] - s['start']) * 1000:8.1f} ms  {_note(s)}")
        console.print(line, overflow="ignore", crop=False, soft_wrap=True)
