"""Tenant isolation of the prefix cache: a prompt cached under one cache salt gives a request under
another salt no cached tokens (and no predicted ones), so a guessed-prefix probe learns nothing."""

from __future__ import annotations

import uuid

import httpx


def _ask(url: str, model: str, system: str, salt: str | None) -> tuple[int, int]:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
        "max_tokens": 2,
    }
    if salt is not None:
        body["cache_salt"] = salt
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return cached, int(r.headers["x-kvrelay-predicted-cached-tokens"])


def test_a_probe_under_another_salt_sees_nothing_cached(tiny_cluster):
    url = tiny_cluster.url
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    secret = f"the launch code is {uuid.uuid4().hex} " * 4
    assert _ask(url, model, secret, "tenant-a")[0] == 0
    assert _ask(url, model, secret, "tenant-b") == (0, 0)  # the other tenant's guess: no signal
    assert _ask(url, model, secret, None) == (0, 0)  # nor an unsalted one
    assert _ask(url, model, secret, "tenant-a")[0] > 0  # the owner still hits its own cache
