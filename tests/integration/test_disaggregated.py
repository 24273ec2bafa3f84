"""Gateway → prefill → KV transfer → decode, as real processes, against one engine alone."""

import asyncio

import grpc
import httpx
import pytest

from common.config import EngineConfig
from common.engine.factory import build_engine
from common.engine.sampling import SamplingParams
from common.rpc import decode_pb2, decode_pb2_grpc, kv_pb2, kv_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from common.rpc.convert import params_to_proto
from tests.helpers import assert_no_leaks, run_to_completion, tokens_of
from tests.integration.client import chat_token_ids, model_id
from tests.integration.conftest import assert_workers_clean
from tests.waiting import wait_for

QUESTIONS = ["hello there", "what is two plus two?", "tell me a long story about a ship " * 6, "x", "abc " * 40]


def reference_tokens(model_dir: str, max_tokens: int) -> list[list[int]]:
    engine = build_engine(EngineConfig(model=model_dir), progress=False)
    params = SamplingParams.create(max_tokens=max_tokens)
    for i, q in enumerate(QUESTIONS):
        engine.add_request(str(i), engine.tokenizer.encode_chat([{"role": "user", "content": q}]), params)
    outs = run_to_completion(engine)
    assert_no_leaks(engine)
    return [tokens_of(outs[str(i)]) for i in range(len(QUESTIONS))]


async def through_gateway(url: str, max_tokens: int) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=60) as client:
        model = await model_id(client, url)
        got = []
        for i, q in enumerate(QUESTIONS):  # alternate streaming and not
            ids, mode = await chat_token_ids(client, url, model, q, max_tokens, stream=bool(i % 2))
            assert mode == "disaggregated"
            got.append(ids)
        return got


def test_greedy_equivalence_grpc(tiny_cluster, tiny_dir):
    got = asyncio.run(through_gateway(tiny_cluster.url, 24))
    assert got == reference_tokens(tiny_dir, 24)


def test_greedy_equivalence_nixl(cluster_factory, tiny_dir):
    run = cluster_factory(tiny_dir, transfer="nixl")
    got = asyncio.run(through_gateway(run.url, 24))
    assert got == reference_tokens(tiny_dir, 24)


def test_colocated_mode_when_no_prefill_worker(cluster_factory, tiny_dir):
    run = cluster_factory(tiny_dir, prefill=0)

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            model = await model_id(client, run.url)
            return await chat_token_ids(client, run.url, model, QUESTIONS[1], 24, stream=False)

    ids, mode = asyncio.run(main())
    assert mode == "colocated"
    assert ids == reference_tokens(tiny_dir, 24)[1]


def test_layout_mismatch_worker_is_never_chosen_and_says_why(cluster_factory, tiny_dir):
    run = cluster_factory(tiny_dir, prefill_extra=["--block-size", "32"], timeout=60, want_colocated=True)

    def why() -> str | None:  # "colocated" may be reported before the prefill worker answered
        return httpx.get(f"{run.url}/ready").json()["workers"]["prefill"]["incompatible"].get(run.prefill[0])

    wait_for(why, 30, "the gateway to find the prefill worker's layout incompatible")
    assert "block_size: 32 != 16" in why()
    model = httpx.get(f"{run.url}/v1/models").json()["data"][0]["id"]
    r = httpx.post(
        f"{run.url}/v1/chat/completions",
        timeout=30,
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0},
    )
    assert r.status_code == 200 and r.headers["x-kvrelay-mode"] == "colocated"


def test_layout_mismatch_at_the_decode_worker_is_a_clear_error(cluster_factory, tiny_dir):
    """Even if a caller pairs them anyway, the decode worker refuses before any byte moves."""
    run = cluster_factory(tiny_dir, prefill_extra=["--block-size", "32"], timeout=60, want_colocated=True)

    def prefill_up() -> bool:  # "colocated" is ready before the prefill worker has loaded its model
        return run.prefill[0] in httpx.get(f"{run.url}/ready").json()["workers"]["prefill"]["incompatible"]

    wait_for(prefill_up, 30, "the prefill worker to answer")

    async def main():
        ids = list(range(40))
        params = params_to_proto(SamplingParams.create(max_tokens=4))
        async with grpc.aio.insecure_channel(run.prefill[0]) as pch, grpc.aio.insecure_channel(run.decode[0]) as dch:
            resp = await prefill_pb2_grpc.PrefillServiceStub(pch).Prefill(
                prefill_pb2.PrefillRequest(request_id="mismatch", token_ids=ids, params=params), timeout=30
            )
            call = decode_pb2_grpc.DecodeServiceStub(dch).Decode(
                decode_pb2.DecodeRequest(
                    request_id="mismatch",
                    handle=resp.handle,
                    prompt_token_ids=ids,
                    first_token=resp.first_token,
                    params=params,
                ),
                timeout=30,
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "KV layouts differ" in err.value.details() and "block_size: 16 != 32" in err.value.details()
            await kv_pb2_grpc.KVServiceStub(pch).Release(kv_pb2.ReleaseRequest(handle=resp.handle), timeout=5)

    asyncio.run(main())


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
