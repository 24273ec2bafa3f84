"""Workload classes through real processes: chat and batch requests kept to their own decode
workers (a label each was started with), with the class's caps and priority."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
import yaml

from kvrelay.launcher import Cluster, free_port, free_worker_ports
from tests.integration.conftest import check_no_kv_held
from tests.waiting import wait_for

CLASSES = {
    "workload_classes": {
        "chat": {"max_prompt_tokens": 48, "max_output_tokens": 8, "pool": "chat"},
        "batch": {"priority": "batch", "pool": "batch"},
    },
    "default_workload_class": "chat",
}


@pytest.fixture
def classed(tiny_dir: str, tmp_path) -> Iterator[tuple[str, dict[str, str]]]:
    cluster = Cluster(log_dir=str(tmp_path), env={"KVRELAY_ROUTING_HEADERS": "true"})
    ports = free_worker_ports(2)
    workers = {}
    try:
        for port, pool in zip(ports, ("chat", "batch"), strict=True):
            workers[pool] = cluster.worker("decode", port, 1, tiny_dir, ["--pool", pool])
        config = os.path.join(tmp_path, "gateway.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(CLASSES, f)
        url = cluster.gateway(free_port(), [], list(workers.values()), tiny_dir, ["--config", config])
        cluster.wait_ready(url, want_mode="colocated")
        wait_for(
            lambda: not any(p["down"] for p in httpx.get(f"{url}/ready").json()["workers"].values()),
            60,
            "both workers to answer",
        )
        yield url, workers
        check_no_kv_held(list(workers.values()))
    finally:
        cluster.stop()


def _ask(url: str, prompt: str, headers: dict | None = None, **extra: object) -> httpx.Response:
    body = {"model": "tiny-llama0", "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    return httpx.post(f"{url}/v1/chat/completions", json={**body, "model": model}, headers=headers, timeout=60)


def test_classes_keep_to_their_pools_and_caps(classed):
    url, workers = classed
    chat = _ask(url, "hi", ignore_eos=True)
    assert chat.status_code == 200, chat.text
    assert chat.headers["x-kvrelay-decode"] == f"decode-{workers['chat'].rsplit(':', 1)[1]}"
    assert chat.json()["usage"]["completion_tokens"] == 8  # no max_tokens: the class's cap is the default

    batch = _ask(url, "a long document " * 20, {"X-Kvrelay-Class": "batch"}, max_tokens=12, ignore_eos=True)
    assert batch.status_code == 200, batch.text
    assert batch.headers["x-kvrelay-decode"] == f"decode-{workers['batch'].rsplit(':', 1)[1]}"
    assert batch.json()["usage"]["completion_tokens"] == 12

    too_long = _ask(url, "a long document " * 20)
    assert too_long.status_code == 400 and "at most 48 tokens" in too_long.json()["error"]["message"]
    too_many = _ask(url, "hi", max_tokens=100)
    assert too_many.status_code == 400 and "allows at most 8" in too_many.json()["error"]["message"]
    unknown = _ask(url, "hi", {"X-Kvrelay-Class": "vip"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_workload_class"
