"""Malformed and hostile requests against a running gateway: each gets a 4xx OpenAI error object
(naming the field where there is one), none reaches a worker, none leaves prompt text in a log;
a 10 MB body is refused unread while /health keeps answering; and a property test fuzzes the chat
schema: 4xx or a valid completion, never a 5xx."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MARKER = "zq-hostile-marker-7731"
MSG = [{"role": "user", "content": f"{MARKER} hi"}]


def _chat(**fields: object) -> dict:
    return {"model": "M", "messages": MSG, "max_tokens": 4, **fields}


def _deep(n: int) -> bytes:
    return b'{"model": "M", "messages": ' + b"[" * n + b"]" * n + b"}"


# (id, path, body: dict | bytes, content type, status, param)
CASES: list[tuple[str, str, object, str, int, str | None]] = [
    ("invalid json", "chat", b'{"model": "M", "messages": [', "application/json", 400, None),
    ("not an object", "chat", b"[1, 2, 3]", "application/json", 400, None),
    ("empty body", "chat", b"", "application/json", 400, None),
    ("wrong content type", "chat", json.dumps(_chat()).encode(), "text/plain", 415, None),
    ("no content type", "chat", json.dumps(_chat()).encode(), "", 415, None),
    ("missing messages", "chat", {"model": "M"}, "application/json", 400, "messages"),
    ("empty messages", "chat", {"model": "M", "messages": []}, "application/json", 400, "messages"),
    ("messages not a list", "chat", _chat(messages="hi"), "application/json", 400, "messages"),
    (
        "bad role",
        "chat",
        _chat(messages=[{"role": "root", "content": "x"}]),
        "application/json",
        400,
        "messages.0.role",
    ),
    (
        "content a number",
        "chat",
        _chat(messages=[{"role": "user", "content": 5}]),
        "application/json",
        400,
        "messages.0.content",
    ),
    ("unknown model", "chat", {**_chat(), "model": "nope"}, "application/json", 404, "model"),
    ("model not a string", "chat", {**_chat(), "model": 7}, "application/json", 400, "model"),
    ("max_tokens zero", "chat", _chat(max_tokens=0), "application/json", 400, "max_tokens"),
    ("max_tokens negative", "chat", _chat(max_tokens=-5), "application/json", 400, "max_tokens"),
    ("max_tokens huge", "chat", _chat(max_tokens=2**70), "application/json", 400, "max_tokens"),
    ("max_tokens string", "chat", _chat(max_tokens="many"), "application/json", 400, "max_tokens"),
    ("max_tokens float", "chat", _chat(max_tokens=2.5), "application/json", 400, "max_tokens"),
    ("temperature negative", "chat", _chat(temperature=-1), "application/json", 400, "temperature"),
    ("temperature huge", "chat", _chat(temperature=1e308), "application/json", 400, "temperature"),
    (
        "temperature NaN",
        "chat",
        b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        "application/json",
        400,
        "temperature",
    ),
    (
        "temperature Infinity",
        "chat",
        b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
        "application/json",
        400,
        "temperature",
    ),
    ("top_p zero", "chat", _chat(top_p=0), "application/json", 400, "top_p"),
    ("top_p above one", "chat", _chat(top_p=1.5), "application/json", 400, "top_p"),
    ("top_k negative", "chat", _chat(top_k=-1), "application/json", 400, "top_k"),
    ("top_k 2**40", "chat", _chat(top_k=2**40), "application/json", 400, "top_k"),
    ("seed 2**64", "chat", _chat(seed=2**64), "application/json", 400, "seed"),
    ("seed string", "chat", _chat(seed="x"), "application/json", 400, "seed"),
    ("stop a number", "chat", _chat(stop=5), "application/json", 400, "stop"),
    ("stop empty string", "chat", _chat(stop=[""]), "application/json", 400, "stop"),
    ("stream not bool", "chat", _chat(stream="yes please"), "application/json", 400, "stream"),
    ("n > 1", "chat", _chat(n=3), "application/json", 400, "n"),
    ("tools", "chat", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), "application/json", 400, "tools"),
    ("tool_choice required", "chat", _chat(tool_choice="required"), "application/json", 400, "tool_choice"),
    ("logprobs", "chat", _chat(logprobs=True), "application/json", 400, "logprobs"),
    ("top_logprobs", "chat", _chat(top_logprobs=3), "application/json", 400, "top_logprobs"),
    ("parallel_tool_calls", "chat", _chat(parallel_tool_calls=False), "application/json", 400, "parallel_tool_calls"),
    ("presence_penalty above 2", "chat", _chat(presence_penalty=2.5), "application/json", 400, "presence_penalty"),
    (
        "frequency_penalty NaN",
        "chat",
        b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": NaN}',
        "application/json",
        400,
        "frequency_penalty",
    ),
    ("repetition_penalty zero", "chat", _chat(repetition_penalty=0), "application/json", 400, "repetition_penalty"),
    ("logit_bias past the vocab", "chat", _chat(logit_bias={"50256": -100}), "application/json", 400, "logit_bias"),
    ("logit_bias of 500", "chat", _chat(logit_bias={"5": 500}), "application/json", 400, "logit_bias"),
    ("logit_bias key not an id", "chat", _chat(logit_bias={"abc": 1}), "application/json", 400, "logit_bias"),
    (
        "a 5000-digit number",
        "chat",
        b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1' + b"0" * 5000 + b"}",
        "application/json",
        400,
        None,
    ),
    (
        "lone surrogate in a key",
        "chat",
        b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "x\\ud800": 1}',
        "application/json",
        400,
        None,
    ),
    (
        "response_format json",
        "chat",
        _chat(response_format={"type": "json_object"}),
        "application/json",
        400,
        "response_format",
    ),
    ("audio", "chat", _chat(audio={"voice": "x"}), "application/json", 400, "audio"),
    (
        "lone surrogate in content",
        "chat",
        b'{"model": "M", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "application/json",
        400,
        "messages.0.content",
    ),
    (
        "lone surrogate in stop",
        "chat",
        b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "stop": ["\\udfff"]}',
        "application/json",
        400,
        "stop.0",
    ),
    (
        "NUL in content",
        "chat",
        b'{"model": "M", "messages": [{"role": "user", "content": "a\\u0000b"}]}',
        "application/json",
        400,
        "messages.0.content",
    ),
    ("deeply nested", "chat", _deep(100_000), "application/json", 400, None),
    ("bad priority", "chat", _chat(priority="vip"), "application/json", 400, "priority"),
    (
        "1 MB message",
        "chat",
        _chat(messages=[{"role": "user", "content": f"{MARKER} " + "word " * 200_000}]),
        "application/json",
        400,
        "messages",
    ),
    ("prompt ids out of vocab", "text", {"model": "M", "prompt": [1, 2, 999999]}, "application/json", 400, "prompt"),
    ("prompt two strings", "text", {"model": "M", "prompt": ["a", "b"]}, "application/json", 400, "prompt"),
    ("prompt empty", "text", {"model": "M", "prompt": ""}, "application/json", 400, "prompt"),
    ("echo", "text", {"model": "M", "prompt": "x", "echo": True}, "application/json", 400, "echo"),
    ("best_of", "text", {"model": "M", "prompt": "x", "best_of": 3}, "application/json", 400, "best_of"),
    ("suffix", "text", {"model": "M", "prompt": "x", "suffix": "y"}, "application/json", 400, "suffix"),
]


def _send(url: str, model: str, path: str, body: object, ctype: str) -> httpx.Response:
    if isinstance(body, dict):
        raw = json.dumps({**body, "model": model} if body.get("model") == "M" else body).encode()
    else:
        raw = body.replace(b'"model": "M"', f'"model": "{model}"'.encode())  # type: ignore[union-attr]
    headers = {"content-type": ctype} if ctype else {}
    endpoint = "/v1/chat/completions" if path == "chat" else "/v1/completions"
    return httpx.post(f"{url}{endpoint}", content=raw, headers=headers, timeout=60)


def _scheduled(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("kvrelay_gateway_scheduled_worker_total{")
    )


@pytest.fixture
def model(tiny_cluster) -> str:
    return httpx.get(f"{tiny_cluster.url}/v1/models").json()["data"][0]["id"]


def test_hostile_requests_get_4xx_and_reach_no_worker(tiny_cluster, model):
    assert len(CASES) >= 40
    before = _scheduled(tiny_cluster.url)
    wrong = []
    for name, path, body, ctype, status, param in CASES:
        r = _send(tiny_cluster.url, model, path, body, ctype)
        err = r.json().get("error") if r.headers.get("content-type") == "application/json" else None
        ok = r.status_code == status and err is not None and set(err) == {"message", "type", "param", "code"}
        if not ok or (param is not None and err["param"] != param):
            wrong.append((name, r.status_code, r.text[:200]))
    assert not wrong, wrong
    assert _scheduled(tiny_cluster.url) == before, "a rejected request was scheduled onto a worker"
    for f in os.listdir(tiny_cluster.cluster.log_dir):
        path = os.path.join(tiny_cluster.cluster.log_dir, f)
        if os.path.isfile(path):
            with open(path, errors="replace") as log:
                assert MARKER not in log.read(), f"prompt text in {f}"


def _completion(url: str, model: str, **fields: object) -> dict:
    body = {"model": model, "prompt": "once upon", "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(f"{url}/v1/completions", json={**body, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_logit_bias_and_penalties_reach_the_workers(tiny_cluster, model):
    greedy = _completion(tiny_cluster.url, model, temperature=0)["token_ids"]
    forced = next(t for t in range(40, 120) if t not in greedy)
    biased = _completion(tiny_cluster.url, model, temperature=0, logit_bias={str(forced): 100})
    assert biased["token_ids"] == [forced] * 8
    penalized = _completion(tiny_cluster.url, model, temperature=0, presence_penalty=2, frequency_penalty=2)
    assert len(set(penalized["token_ids"])) >= len(set(greedy))
    defaults = dict(presence_penalty=0, frequency_penalty=0, repetition_penalty=1, logit_bias={})
    assert _completion(tiny_cluster.url, model, temperature=0, **defaults)["token_ids"] == greedy


def test_a_tiny_top_p_is_nearly_greedy_across_the_wire(tiny_cluster, model):
    greedy = _completion(tiny_cluster.url, model, temperature=0)["token_ids"]
    free = _completion(tiny_cluster.url, model, temperature=2, top_p=1.0, seed=11)["token_ids"]
    assert free != greedy, "temperature 2 should wander off the greedy path on the tiny model"
    assert _completion(tiny_cluster.url, model, temperature=2, top_p=1e-7, seed=11)["token_ids"] == greedy


def test_unknown_path_and_wrong_method_are_openai_errors(tiny_cluster):
    r = httpx.get(f"{tiny_cluster.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{tiny_cluster.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_10mb_body_is_refused_unread_and_health_keeps_answering(tiny_cluster, model):
    big = json.dumps(_chat(model=model, messages=[{"role": "user", "content": "x" * 10_000_000}])).encode()
    health: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            httpx.get(f"{tiny_cluster.url}/health", timeout=10)
            health.append(time.monotonic() - t0)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        t0 = time.monotonic()
        r = httpx.post(
            f"{tiny_cluster.url}/v1/chat/completions",
            content=big,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        took = time.monotonic() - t0
    finally:
        stop.set()
        poller.join()
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert took < 5 and health and max(health) < 1.0


def test_a_chunked_body_over_the_limit_is_refused(tiny_cluster):
    host, port = tiny_cluster.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 65536
        reply = b""
        for _ in range(200):  # 12.5 MB at most
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break
            s.settimeout(0.01)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                reply += s.recv(65536)
            s.settimeout(10)
            if reply:
                break
        reply += s.recv(65536) if not reply else b""
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"]),
        "content": st.one_of(st.text(max_size=40), _scalars),
    }
)
_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(_message, max_size=3), _scalars)},
    optional={
        "max_tokens": st.one_of(st.integers(min_value=-3, max_value=6), _scalars),
        "temperature": st.one_of(st.floats(min_value=-1, max_value=3, allow_nan=False), _scalars),
        "top_p": st.one_of(st.floats(min_value=-0.5, max_value=1.5, allow_nan=False), _scalars),
        "top_k": _scalars,
        "seed": _scalars,
        "stop": st.one_of(st.lists(st.text(max_size=5), max_size=3), _scalars),
        "stream": _scalars,
        "n": _scalars,
        "presence_penalty": _scalars,
        "logit_bias": st.one_of(st.dictionaries(st.text(max_size=4), st.integers(), max_size=2), _scalars),
        "ignore_eos": _scalars,
        "extra_field": _scalars,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_body)
def test_fuzzed_chat_requests_never_get_a_5xx(tiny_cluster, model, body):
    body = {"model": model, **body}
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 6)  # keep valid requests short
    else:
        body.setdefault("max_tokens", 4)
    r = httpx.post(f"{tiny_cluster.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code < 500, (body, r.text[:300])
    if r.status_code == 200:
        if "text/event-stream" in r.headers.get("content-type", ""):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        else:
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
    else:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
