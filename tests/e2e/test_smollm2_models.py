"""Two real models behind one gateway: the SmolLM2 GGUF served fp16 (the default) and the same
weights from the repository under another id, served int8; one decode worker whose memory budget
holds one of them at a time, so each switch evicts the other and loads it from the repository."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from common.model_source import default_model_path
from common.repository.store import ModelRepository
from tests.integration.client import metric
from tests.integration.conftest import assert_workers_clean, start_cluster

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


def test_two_real_models_on_a_budget_of_one(tmp_path, model_repository):
    ModelRepository(model_repository).add(
        default_model_path(), "smollm2-int8", version="1", progress=False, serve_quantization="int8"
    )
    models = "smollm2-135m-instruct,smollm2-int8"
    # fp16 weights ~270 MB, int8 ~135 MB, each with a 64 MB KV cache: 450 MB holds one, not both.
    worker = ["--models", models, "--kv-cache-mb", "64", "--memory-budget-mb", "450"]
    run = start_cluster(
        str(tmp_path), None, prefill=0, decode_extra=worker, gateway_extra=["--models", models], timeout=240
    )
    try:

        async def main() -> dict[str, str]:
            answers = {}
            async with httpx.AsyncClient(timeout=120) as client:
                listed = [m["id"] for m in (await client.get(f"{run.url}/v1/models")).json()["data"]]
                assert listed == ["smollm2-135m-instruct", "smollm2-int8"]
                for model in ["smollm2-int8", "smollm2-135m-instruct", "smollm2-int8"]:
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": QUESTION}],
                        "temperature": 0,
                        "max_tokens": 20,
                    }
                    r = await client.post(f"{run.url}/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    assert r.json()["model"] == model
                    answers[model] = r.json()["choices"][0]["message"]["content"]
            await assert_workers_clean(run.workers())
            return answers

        answers = asyncio.run(main())
        assert "Paris" in answers["smollm2-135m-instruct"]
        assert answers["smollm2-int8"].strip()  # lossy on a 135M model: an answer, not necessarily Paris
        host, port = run.decode[0].rsplit(":", 1)
        url = f"http://{host}:{int(port) + 1000}"
        assert metric(url, "kvrelay_worker_model_loads_total", model="smollm2-int8") == 2
        assert metric(url, "kvrelay_worker_model_evictions_total", model="smollm2-135m-instruct") >= 1
        budget = metric(url, "kvrelay_worker_memory_budget_bytes")
        loaded = [
            m for m in ("smollm2-135m-instruct", "smollm2-int8") if metric(url, "kvrelay_worker_model_loaded", model=m)
        ]
        assert len(loaded) == 1 and metric(url, "kvrelay_worker_model_bytes", model=loaded[0]) <= budget
    finally:
        run.cluster.stop()
