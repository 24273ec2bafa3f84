"""What an on-call engineer reads must be true: every request ends with a recorded outcome (metric,
root span), a clean streamed run logs no error, the phases of a request add up to its span, the
colocated path counts its prefix-cache hits, and workers say who they are and where time went."""

from __future__ import annotations

import asyncio
import os
import re

import httpx

from common.tracing.jsonl import read_spans
from tests.integration.client import metric
from tests.waiting import wait_for

SECRET = "zanzibar quokka"  # a phrase that appears in prompts only
OUTCOMES = ("ok", "client_error", "cancelled", "overloaded", "worker_lost", "timeout", "server_error")


def _model(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def _outcomes(url: str) -> dict[str, float]:
    return {o: metric(url, "kvrelay_gateway_requests_total", outcome=o) for o in OUTCOMES}


def _chat(url: str, content: str, stream: bool = False, **extra: object) -> httpx.Response:
    body = {
        "model": _model(url),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "ignore_eos": True,
        **extra,
    }
    return httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": stream}, timeout=60)


async def _leave_after_first_chunk(url: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "count"}], "max_tokens": 200, "stream": True}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                return  # closing the stream here disconnects mid-generation


def test_every_request_ends_with_an_outcome(tiny_cluster):
    url = tiny_cluster.url
    before = _outcomes(url)
    assert _chat(url, "hi").status_code == 200
    assert _chat(url, "hi", stream=True).status_code == 200
    assert _chat(url, "hi", max_tokens=0).status_code == 400
    assert _chat(url, "hi", model="no-such-model").status_code == 404
    asyncio.run(_leave_after_first_chunk(url, _model(url)))

    def delta() -> dict[str, float]:
        now = _outcomes(url)
        return {o: now[o] - before[o] for o in OUTCOMES if now[o] != before[o]}

    want = {"ok": 2, "client_error": 2, "cancelled": 1}
    wait_for(lambda: delta() == want, 15, f"outcomes {want}")
    assert metric(url, "kvrelay_gateway_requests_total", outcome="ok", finish_reason="length") >= 2
    # a 2xx stream whose outcome was never recorded would show as server_error "incomplete": none did
    assert metric(url, "kvrelay_gateway_requests_total", outcome="server_error") == before["server_error"]


def test_a_clean_run_logs_no_error_and_its_phases_add_up(cluster_factory, tiny_dir, tmp_path):
    run = cluster_factory(tiny_dir)
    trace_ids = []
    for stream in (True, False, True):
        r = _chat(run.url, f"tell me a story about {SECRET}", stream=stream, max_tokens=8)
        assert r.status_code == 200
        trace_ids.append(r.headers["x-trace-id"])
    bad = _chat(run.url, "x", max_tokens=0)
    assert bad.status_code == 400

    trace_dir = os.path.join(tmp_path, "traces")

    def roots() -> dict[str, dict]:
        return {
            s["trace_id"]: s
            for s in read_spans(trace_dir)
            if s["parent_id"] is None and s["service"] == "kvrelay-gateway"
        }

    wait_for(lambda: len(roots()) == 4, 15, "the four root spans")
    by_trace = roots()
    for tid in trace_ids:
        root = by_trace[tid]
        a = root["attributes"]
        assert a["kvrelay.outcome"] == "ok" and a["http.route"] == "/v1/chat/completions"
        assert root["name"] == "POST /v1/chat/completions" and root["status"] != "error"
        phases = {k: v for k, v in a.items() if k.startswith("kvrelay.phase.")}
        assert {"kvrelay.phase.prefill_seconds", "kvrelay.phase.decode_seconds"} <= set(phases)
        duration = root["end"] - root["start"]
        assert abs(sum(phases.values()) - duration) <= max(0.05 * duration, 0.002), (phases, duration)
    failed = by_trace[bad.headers["x-trace-id"]]
    assert failed["attributes"]["kvrelay.outcome"] == "client_error"
    assert failed["attributes"]["error.type"] == "invalid_request_error"
    assert failed["status"] != "error"  # the client's mistake is not a server error

    assert_no_error_logged(tmp_path)
    assert_no_prompt_text(tmp_path)


def assert_no_prompt_text(log_dir) -> None:  # noqa: ANN001
    """Without the content-capture opt-in, no log or span file holds a word of any prompt."""
    for root, _, files in os.walk(log_dir):
        for name in files:
            if name.endswith((".log", ".jsonl")):
                with open(os.path.join(root, name), errors="replace") as f:
                    assert SECRET not in f.read(), os.path.join(root, name)


def assert_no_error_logged(log_dir) -> None:  # noqa: ANN001
    """No process's log has an ERROR line (the context-detach error of streamed requests among them)."""
    for name in os.listdir(log_dir):
        if name.endswith(".log"):
            with open(os.path.join(log_dir, name), errors="replace") as f:
                errors = [line for line in f if re.search(r'\bERROR\b|"level": ?"ERROR"', line)]
            assert not errors, f"{name}: {errors[:3]}"


def test_workers_report_who_they_are_and_where_time_went(tiny_cluster):
    assert _chat(tiny_cluster.url, "hello there", max_tokens=6).status_code == 200
    prefill, decode = (
        f"http://127.0.0.1:{int(a.rsplit(':', 1)[1]) + 1000}" for a in (tiny_cluster.prefill[0], tiny_cluster.decode[0])
    )
    assert metric(prefill, "kvrelay_worker_info", role="prefill") == 1
    assert metric(decode, "kvrelay_worker_info", role="decode") == 1
    for name in ("kvrelay_worker_request_queue_seconds_count", "kvrelay_worker_request_prefill_seconds_count"):
        assert metric(prefill, name, role="prefill") >= 1, name
    assert metric(prefill, "kvrelay_worker_kv_export_seconds_count") >= 1
    assert metric(prefill, "kvrelay_worker_prefix_cache_queries_total", role="prefill") > 0
    assert metric(decode, "kvrelay_kv_transfer_bytes_sum") > 0
    assert metric(decode, "kvrelay_worker_request_decode_seconds_count", role="decode") >= 1
    assert metric(tiny_cluster.url, "kvrelay_gateway_info") == 1
    assert metric(tiny_cluster.url, "kvrelay_gateway_phase_seconds_count", phase="prefill") >= 1


def test_colocated_mode_counts_its_prefix_cache_hits_and_logs_no_error(cluster_factory, tiny_dir, tmp_path):
    run = cluster_factory(tiny_dir, prefill=0, decode=1, force_pd=False, want_colocated=True)
    long = "the same long system prompt " * 12
    cached = []
    for _ in range(2):
        r = _chat(run.url, long)
        assert r.status_code == 200 and r.headers["x-kvrelay-mode"] == "colocated"
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[1] > 0, cached
    assert metric(run.url, "kvrelay_gateway_prefix_cached_tokens_total", kind="actual") == sum(cached)
    # A colocated stream opens its decode span while awaiting the first token and closes it while
    # streaming, in another task: no context may be attached across the two.
    assert _chat(run.url, "stream it", stream=True, max_tokens=8).status_code == 200
    assert_no_error_logged(tmp_path)
