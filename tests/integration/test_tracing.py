"""One trace per request across gateway, scheduling, prefill, KV transfer and decode, read back
from the span files the processes export; `kvrelay trace`; no prompt text unless opted in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from common.tracing.jsonl import read_spans
from tests.waiting import wait_for

MARKER = "zebra marmalade quartz"
# The span each service ends last for a disaggregated request. A batch span processor exports spans
# in the order they ended, so once these are in the files, so is every other span of the trace.
LAST_SPANS = {
    ("kvrelay-gateway", "POST /v1/chat/completions"),  # the request's root, open until the body is sent
    ("kvrelay-prefill", "KVService/Release"),  # the decode worker has pulled the blocks
    ("kvrelay-decode", "DecodeService/Decode"),  # the last token streamed
}


def spans_of(trace_dir: str, trace_id: str, timeout: float = 15.0) -> list[dict]:
    """The trace's spans once every service has exported its part (they export in batches)."""
    spans: list[dict] = []

    def complete() -> bool:
        nonlocal spans
        spans = [s for s in read_spans(trace_dir) if s["trace_id"] == trace_id]
        return LAST_SPANS.issubset((s["service"], s["name"]) for s in spans)

    try:
        wait_for(complete, timeout, f"every service to export its spans of trace {trace_id}")
    except AssertionError as e:
        raise AssertionError(f"{e}; have {sorted((s['service'], s['name']) for s in spans)}") from None
    return spans


def chat(url: str, content: str, headers: dict | None = None, stream: bool = False) -> httpx.Response:
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "stream": stream}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def assert_one_tree(spans: list[dict]) -> dict:
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if s["parent_id"] not in ids]
    assert len(roots) == 1, f"expected one root, got {[(s['name'], s['service']) for s in roots]}"
    assert len(ids) == len(spans), "span ids must be unique"
    return roots[0]


def check_disaggregated_trace(spans: list[dict], backend: str) -> None:
    root = assert_one_tree(spans)
    assert root["name"] == "POST /v1/chat/completions" and root["service"] == "kvrelay-gateway"
    assert {s["service"] for s in spans} == {"kvrelay-gateway", "kvrelay-prefill", "kvrelay-decode"}
    by_name = {s["name"]: s for s in spans}
    for name in ("schedule", "prefill", "PrefillService/Prefill", "decode", "DecodeService/Decode", "kv_transfer"):
        assert name in by_name, f"missing span {name}: {sorted(by_name)}"
    a = root["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] == 6
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert any(e["name"] == "first_token" for e in root["events"])
    # the P/D handoff: the worker spans hang off the gateway's client spans, the transfer off decode
    assert by_name["PrefillService/Prefill"]["parent_id"] == by_name["prefill"]["span_id"]
    assert by_name["DecodeService/Decode"]["parent_id"] == by_name["decode"]["span_id"]
    transfer = by_name["kv_transfer"]
    assert transfer["parent_id"] == by_name["DecodeService/Decode"]["span_id"]
    assert transfer["attributes"]["kvrelay.transfer.backend"] == backend
    assert transfer["attributes"]["kvrelay.transfer.bytes"] > 0
    pulled = "KVService/PullBlocks" if backend == "grpc" else "KVService/NixlHandshake"
    assert by_name[pulled]["service"] == "kvrelay-prefill"
    assert by_name[pulled]["parent_id"] == transfer["span_id"]
    sched = by_name["schedule"]["attributes"]
    assert sched["kvrelay.schedule.mode"] == "disaggregated" and sched["kvrelay.schedule.prefill_candidates"]
    assert transfer["kind"] == "client"  # the decode -> prefill edge of a service graph
    assert root["attributes"]["kvrelay.outcome"] == "ok"
    # every second attributed: each service's phases add up to its span
    for name, phases in (
        ("PrefillService/Prefill", {"queue", "prefill", "export"}),
        ("DecodeService/Decode", {"queue", "transfer", "decode_queue", "decode"}),
        ("POST /v1/chat/completions", {"tokenize", "admission", "schedule", "prefill", "decode", "respond"}),
    ):
        span = by_name[name]
        got = {
            k[len("kvrelay.phase.") : -len("_seconds")]: v
            for k, v in span["attributes"].items()
            if k.startswith("kvrelay.phase.")
        }
        assert set(got) == phases, (name, got)
        duration = span["end"] - span["start"]
        assert abs(sum(got.values()) - duration) <= max(0.05 * duration, 0.002), (name, got, duration)


def read_text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def kvrelay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "trace", *args], capture_output=True, text=True, timeout=60
    )


def test_one_trace_across_services_with_client_context_and_cli(cluster_factory, tiny_dir, tmp_path):
    run = cluster_factory(tiny_dir)
    trace_dir = os.path.join(tmp_path, "traces")
    r = chat(run.url, MARKER)
    trace_id = r.headers["x-trace-id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    spans = spans_of(trace_dir, trace_id)
    check_disaggregated_trace(spans, "grpc")
    assert len({s["trace_id"] for s in read_spans(trace_dir)}) == 1, "one request, one trace"

    # a client's traceparent becomes the parent of the gateway's span
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = chat(run.url, "hello", {"traceparent": f"00-{client_trace}-{client_span}-01"}, stream=True)
    assert r.headers["x-trace-id"] == client_trace
    root = assert_one_tree(spans_of(trace_dir, client_trace))
    assert root["parent_id"] == client_span

    # a malformed one is ignored: a new trace, no error
    r = chat(run.url, "hello", {"traceparent": "00-zzzz-not-a-trace-01"})
    assert r.headers["x-trace-id"] not in (client_trace, trace_id)

    # no prompt text in spans or logs by default
    text = "".join(read_text(os.path.join(trace_dir, f)) for f in os.listdir(trace_dir))
    logs = "".join(read_text(os.path.join(tmp_path, f)) for f in os.listdir(tmp_path) if f.endswith(".log"))
    assert MARKER not in text and MARKER not in logs
    assert "gen_ai.prompt" not in text

    out = kvrelay("ls", "--dir", trace_dir)
    assert out.returncode == 0 and trace_id[:12] in out.stdout, out.stdout + out.stderr
    out = kvrelay("show", trace_id, "--dir", trace_dir)
    assert out.returncode == 0, out.stderr
    for name in ("POST /v1/chat/completions", "kv_transfer", "DecodeService/Decode", "█"):
        assert name in out.stdout, out.stdout
    shown = json.loads(kvrelay("show", trace_id, "--dir", trace_dir, "--json").stdout)
    assert shown["trace_id"] == trace_id and len(shown["spans"]) == len(spans)
    keys = {"name", "service", "span_id", "parent_id", "start", "end", "attributes", "status", "status_description"}
    assert keys | {"kind", "events", "links", "resource", "scope"} <= set(shown["spans"][0])
    root = shown["spans"][0]
    assert root["kind"] == "server" and any(e["name"] == "first_token" for e in root["events"])
    assert root["resource"]["service.instance.id"] and root["resource"]["service.version"]
    assert root["scope"]["name"] == "kvrelay.gateway"
    listed = [json.loads(line) for line in kvrelay("ls", "--dir", trace_dir, "--json").stdout.splitlines()]
    assert {row["outcome"] for row in listed} == {"ok"}
    missing = kvrelay("show", "0" * 32, "--dir", trace_dir)
    assert missing.returncode == 1 and "no trace" in missing.stderr


def test_one_trace_with_nixl(cluster_factory, tiny_dir, tmp_path):
    run = cluster_factory(tiny_dir, transfer="nixl")
    r = chat(run.url, "hello there")
    check_disaggregated_trace(spans_of(os.path.join(tmp_path, "traces"), r.headers["x-trace-id"]), "nixl")


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_text_only_with_the_opt_in(cluster_factory, tiny_dir, tmp_path, stream):
    run = cluster_factory(tiny_dir, env={"KVRELAY_TRACING__CAPTURE_CONTENT": "true"})
    r = chat(run.url, MARKER, stream=stream)
    spans = spans_of(os.path.join(tmp_path, "traces"), r.headers["x-trace-id"])
    root = assert_one_tree(spans)
    messages = json.loads(root["attributes"]["gen_ai.input.messages"])
    assert messages[-1]["role"] == "user" and messages[-1]["parts"][0]["content"] == MARKER
    answer = json.loads(root["attributes"]["gen_ai.output.messages"])
    assert answer[0]["role"] == "assistant" and answer[0]["parts"][0]["content"]
    assert "gen_ai.prompt" not in root["attributes"]  # the deprecated attribute is gone
