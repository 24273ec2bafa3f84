"""The real SmolLM2 through `kvrelay up`'s process layout, KV over NIXL: it knows its capitals."""

import asyncio

import pytest

from tests.integration.conftest import assert_workers_clean, start_cluster

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")


def test_capital_of_france_over_nixl(tmp_path):
    run = start_cluster(str(tmp_path), None, transfer="nixl", timeout=240)
    try:
        client = openai.OpenAI(base_url=f"{run.url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=20,
        )
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        asyncio.run(assert_workers_clean(run.workers()))
    finally:
        run.cluster.stop()
