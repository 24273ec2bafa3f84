"""The official openai client against the gateway, and every kind of bad input getting a 4xx."""

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from common.tokenizer import Tokenizer
from tests.integration.conftest import assert_workers_clean, worker_stats

openai = pytest.importorskip("openai")


@pytest.fixture
def client(tiny_cluster):  # per test, as tiny_cluster is: each test that sends traffic gets its leak check
    return openai.OpenAI(base_url=f"{tiny_cluster.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def model(client):
    return client.models.list().data[0].id


def test_chat_non_streaming_with_usage(client, model, tiny_dir):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10
    # the byte-level tiny tokenizer: 3 special tokens + one token per other byte of the template
    expected = Tokenizer.from_dir(Path(tiny_dir)).encode_chat([{"role": "user", "content": "hi"}])
    assert r.usage.prompt_tokens == len(expected) == 3 + len("user\nhi\nassistant\n")
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_chat_streaming_matches_non_streaming(client, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "stream me"}], max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_both_ways(client, model):
    r = client.completions.create(model=model, prompt="once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens == len("once upon a time")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="once upon a time", max_tokens=8, temperature=0, stream=True
        )
    )
    assert streamed == r.choices[0].text


def test_stop_string_is_honoured(client, model):
    full = (
        client.completions.create(
            model=model, prompt="abc", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    cut_at = full[3:6] if len(full) >= 6 else None
    if not cut_at or not cut_at.strip() or "\ufffd" in full[:6]:
        pytest.skip("tiny model output has no usable stop string")
    r = client.completions.create(model=model, prompt="abc", max_tokens=20, temperature=0, stop=[cut_at])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(cut_at)]


def test_seeded_sampling_is_reproducible(client, model):
    kw = dict(model=model, prompt="dice", max_tokens=12, temperature=1.0, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_models_health_ready(tiny_cluster, model):
    assert httpx.get(f"{tiny_cluster.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{tiny_cluster.url}/ready").json()
    assert ready["ready"] and ready["mode"] == "disaggregated"


def _post(url: str, body, content_type: str = "application/json", path: str = "/v1/chat/completions"):
    data = body if isinstance(body, bytes | str) else __import__("json").dumps(body)
    return httpx.post(url + path, content=data, headers={"content-type": content_type}, timeout=30)


BAD = [
    ("invalid json", b"{not json", "application/json", 400, None),
    ("not an object", b"[1, 2]", "application/json", 400, None),
    ("wrong content type", b"{}", "text/plain", 415, None),
    ("missing messages", {"model": "M"}, "application/json", 400, "messages"),
    ("mistyped messages", {"model": "M", "messages": "hello"}, "application/json", 400, "messages"),
    ("empty messages", {"model": "M", "messages": []}, "application/json", 400, "messages"),
    (
        "bad role",
        {"model": "M", "messages": [{"role": "wizard", "content": "x"}]},
        "application/json",
        400,
        "messages.0.role",
    ),
    (
        "unknown model",
        {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
        "application/json",
        404,
        "model",
    ),
    (
        "max_tokens zero",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        "application/json",
        400,
        "max_tokens",
    ),
    (
        "max_tokens over limit",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
        "application/json",
        400,
        "max_tokens",
    ),
    (
        "max_tokens past context",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1010},
        "application/json",
        400,
        "max_tokens",
    ),
    (
        "prompt beyond context",
        {"model": "M", "messages": [{"role": "user", "content": "y" * 1100}]},
        "application/json",
        400,
        "messages",
    ),
    (
        "temperature negative",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        "application/json",
        400,
        "temperature",
    ),
    (
        "top_p zero",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "top_p": 0},
        "application/json",
        400,
        "top_p",
    ),
    (
        "stop wrong type",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "stop": 5},
        "application/json",
        400,
        "stop",
    ),
    ("n > 1", {"model": "M", "messages": [{"role": "user", "content": "x"}], "n": 3}, "application/json", 400, "n"),
]


@pytest.mark.parametrize(("name", "body", "ctype", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(tiny_cluster, model, name, body, ctype, status, param):
    if isinstance(body, dict):
        body = {**body, "model": model if body.get("model") == "M" else body.get("model")}
        body = {k: v for k, v in body.items() if v is not None}
    before = [asyncio.run(worker_stats(a)).prefix_query_tokens for a in tiny_cluster.workers()]
    r = _post(tiny_cluster.url, body, ctype)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    after = [asyncio.run(worker_stats(a)).prefix_query_tokens for a in tiny_cluster.workers()]
    assert after == before, "a rejected request reached a worker"


def test_bad_completions_prompt(tiny_cluster, model):
    r = _post(tiny_cluster.url, {"model": model, "prompt": [1, 2, 99999]}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = _post(tiny_cluster.url, {"model": model, "prompt": ["a", "b"]}, path="/v1/completions")
    assert r.status_code == 400 and "one prompt" in r.json()["error"]["message"]


def test_client_disconnect_cancels_on_the_workers(tiny_cluster, model):
    async def main():
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "go on forever"}],
            "max_tokens": 900,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", f"{tiny_cluster.url}/v1/chat/completions", json=body) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data:")
                    if n >= 5:
                        break  # leave mid-stream
            t0 = time.monotonic()
            await assert_workers_clean(tiny_cluster.workers(), wait_s=5.0)
            return time.monotonic() - t0

    assert asyncio.run(main()) < 5.0
