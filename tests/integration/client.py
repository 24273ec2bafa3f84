"""Small HTTP helpers for the integration tests."""

from __future__ import annotations

import json

import httpx


async def model_id(client: httpx.AsyncClient, url: str) -> str:
    return (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]


async def chat_token_ids(
    client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int, stream: bool
) -> tuple[list[int], str]:
    """Greedy output token ids (via the return_token_ids extension) and the serving mode."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "return_token_ids": True,
        "stream": stream,
    }
    if not stream:
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"], r.headers["x-kvrelay-mode"]
    ids: list[int] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    ids += c.get("token_ids", [])
        return ids, r.headers["x-kvrelay-mode"]


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`, from a /metrics page (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def address_of(worker_id: str, host: str = "127.0.0.1") -> str:
    """A test worker's address from its id (the launcher names workers `{role}-{port}`)."""
    return f"{host}:{worker_id.rsplit('-', 1)[1]}" if worker_id else ""


def routed(response: httpx.Response, role: str) -> str:
    """The address of the `role` worker that served a response (from the routing headers)."""
    return address_of(response.headers.get(f"x-kvrelay-{role}", ""))
