"""Gateway → prefill → KV transfer → decode, as real processes, against one engine alone."""

import asyncio

import httpx
import pytest

from common.config import EngineConfig
from common.engine.factory import build_engine
from common.engine.sampling import SamplingParams
from tests.helpers import assert_no_leaks, run_to_completion, tokens_of
from tests.integration.client import chat_token_ids, model_id
from tests.integration.conftest import assert_workers_clean

QUESTIONS = ["hello there", "what is two plus two?", "tell me a long story about a ship " * 6, "x", "abc " * 40]


def reference_tokens(model_dir: str, max_tokens: int) -> list[list[int]]:
    engine = build_engine(EngineConfig(model=model_dir), progress=False)
    params = SamplingParams.create(max_tokens=max_tokens)
    for i, q in enumerate(QUESTIONS):
        engine.add_request(str(i), engine.tokenizer.encode_chat([{"role": "user", "content": q}]), params)
    outs = run_to_completion(engine)
    assert_no_leaks(engine)
    return [tokens_of(outs[str(i)]) for i in range(len(QUESTIONS))]


async def through_gateway(url: str, workers: list[str], max_tokens: int) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=60) as client:
        model = await model_id(client, url)
        got = []
        for i, q in enumerate(QUESTIONS):  # alternate streaming and not
            ids, mode = await chat_token_ids(client, url, model, q, max_tokens, stream=bool(i % 2))
            assert mode == "disaggregated"
            got.append(ids)
        await assert_workers_clean(workers)
        return got


def test_greedy_equivalence_grpc(tiny_cluster, tiny_dir):
    got = asyncio.run(through_gateway(tiny_cluster.url, tiny_cluster.workers(), 24))
    assert got == reference_tokens(tiny_dir, 24)


def test_greedy_equivalence_nixl(cluster_factory, tiny_dir):
    run = cluster_factory(tiny_dir, transfer="nixl")
    got = asyncio.run(through_gateway(run.url, run.workers(), 24))
    assert got == reference_tokens(tiny_dir, 24)


def test_colocated_mode_when_no_prefill_worker(cluster_factory, tiny_dir):
    run = cluster_factory(tiny_dir, prefill=0)

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            model = await model_id(client, run.url)
            ids, mode = await chat_token_ids(client, run.url, model, QUESTIONS[1], 24, stream=False)
            await assert_workers_clean(run.workers())
            return ids, mode

    ids, mode = asyncio.run(main())
    assert mode == "colocated"
    assert ids == reference_tokens(tiny_dir, 24)[1]


def test_layout_mismatch_is_a_clear_error(cluster_factory, tiny_dir):
    run = cluster_factory(tiny_dir, prefill_extra=["--block-size", "32"])
    r = httpx.post(
        f"{run.url}/v1/chat/completions",
        timeout=30,
        json={
            "model": httpx.get(f"{run.url}/v1/models").json()["data"][0]["id"],
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert r.status_code == 502
    err = r.json()["error"]
    assert "KV layouts differ" in err["message"] and "block_size: 16 != 32" in err["message"]
    assert err["code"] == "worker_incompatible"
    asyncio.run(assert_workers_clean(run.workers()))


@pytest.mark.parametrize("stream", [False, True])
def test_sixteen_concurrent_requests_complete_and_leave_no_kv(tiny_cluster, stream):
    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            model = await model_id(client, tiny_cluster.url)
            results = await asyncio.gather(
                *(
                    chat_token_ids(client, tiny_cluster.url, model, f"request number {i} " * (1 + i % 5), 20, stream)
                    for i in range(16)
                )
            )
            await assert_workers_clean(tiny_cluster.workers())
            return results

    results = asyncio.run(main())
    assert len(results) == 16 and all(ids for ids, _ in results)
