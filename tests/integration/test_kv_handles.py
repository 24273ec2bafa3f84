"""KV handles are capabilities, tried as an attacker on the same network would (real processes):
a forged, altered, foreign or expired handle moves no byte and frees nothing; KV computed for one
prompt can never be stored under another's hashes; a decode worker dials only sources it trusts;
a bad first token fails only its own request. Every test ends with the cluster's leak check."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest

from common.engine.sampling import SamplingParams
from common.rpc import decode_pb2, decode_pb2_grpc, kv_pb2, kv_pb2_grpc, prefill_pb2, prefill_pb2_grpc, types_pb2
from common.rpc.convert import params_to_proto
from tests.integration.client import chat_token_ids, model_id
from tests.integration.conftest import worker_stats

PARAMS = params_to_proto(SamplingParams.create(max_tokens=8, temperature=0.0))


async def _prefill(address: str, request_id: str, ids: list[int]) -> prefill_pb2.PrefillResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        return await prefill_pb2_grpc.PrefillServiceStub(ch).Prefill(
            prefill_pb2.PrefillRequest(request_id=request_id, token_ids=ids, params=PARAMS), timeout=30
        )


async def _pull(address: str, handle: types_pb2.KVHandle, layout: types_pb2.KVLayout) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as ch:
        call = kv_pb2_grpc.KVServiceStub(ch).PullBlocks(
            kv_pb2.PullBlocksRequest(handle=handle, layout=layout, blocks_per_chunk=1), timeout=10
        )
        try:
            chunks = [c async for c in call]
        except grpc.aio.AioRpcError as e:
            return e.code()
        assert chunks
        return grpc.StatusCode.OK


async def _release(address: str, handle: types_pb2.KVHandle) -> grpc.StatusCode | bool:
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            resp = await kv_pb2_grpc.KVServiceStub(ch).Release(kv_pb2.ReleaseRequest(handle=handle), timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return resp.released


async def _decode(address: str, rid: str, handle, prompt: list[int], first_token: int) -> list[int] | grpc.StatusCode:  # noqa: ANN001
    async with grpc.aio.insecure_channel(address) as ch:
        call = decode_pb2_grpc.DecodeServiceStub(ch).Decode(
            decode_pb2.DecodeRequest(
                request_id=rid, handle=handle, prompt_token_ids=prompt, first_token=first_token, params=PARAMS
            ),
            timeout=30,
        )
        try:
            return [t async for c in call for t in c.token_ids]
        except grpc.aio.AioRpcError as e:
            return e.code()


def _forgeries(h: types_pb2.KVHandle) -> dict[str, types_pb2.KVHandle]:
    out = {}
    for name, change in {
        "other blocks": lambda f: f.block_ids.__setitem__(0, f.block_ids[0] + 1),
        "longer lease": lambda f: setattr(f, "lease_deadline_unix", f.lease_deadline_unix + 3600),
        "other prompt": lambda f: setattr(f, "prompt_digest", bytes(32)),
        "no signature": lambda f: f.ClearField("signature"),
    }.items():
        forged = types_pb2.KVHandle()
        forged.CopyFrom(h)
        change(forged)
        out[name] = forged
    return out


def test_forged_and_foreign_handles_move_nothing_and_free_nothing(cluster_factory, tiny_dir):
    run = cluster_factory(tiny_dir)
    prefill = run.prefill[0]

    async def main() -> None:
        handle = (await _prefill(prefill, "victim", list(range(40)))).handle
        own = (await _prefill(prefill, "attacker", list(range(50, 90)))).handle
        assert len(handle.signature) == 32 and len(handle.prompt_digest) == 32
        forgeries = _forgeries(handle)
        # the attacker's own, valid handle, renamed to the victim's request id (which leaks in X-Request-Id)
        forgeries["other request"] = types_pb2.KVHandle()
        forgeries["other request"].CopyFrom(own)
        forgeries["other request"].request_id = "victim"
        for name, forged in forgeries.items():
            assert await _pull(prefill, forged, handle.layout) == grpc.StatusCode.PERMISSION_DENIED, name
            assert await _release(prefill, forged) == grpc.StatusCode.PERMISSION_DENIED, name
        # the victim's KV is still pinned, whole, for its own handle
        assert (await worker_stats(prefill)).pinned == 2
        assert await _pull(prefill, handle, handle.layout) == grpc.StatusCode.OK
        assert await _release(prefill, handle) is True
        assert await _release(prefill, own) is True

    asyncio.run(main())


def test_an_expired_handle_is_refused(cluster_factory, tiny_dir):
    run = cluster_factory(tiny_dir, env={"KVRELAY_ENGINE__LEASE_SECONDS": "1"})

    async def main() -> None:
        resp = await _prefill(run.prefill[0], "late", list(range(40)))
        await asyncio.sleep(max(0.0, resp.handle.lease_deadline_unix - time.time()) + 0.2)
        assert await _pull(run.prefill[0], resp.handle, resp.handle.layout) == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(main())


def test_kv_cannot_be_imported_under_another_prompt(cluster_factory, tiny_dir):
    """Prefill of prompt A, then Decode of prompt V with A's handle: refused, and afterwards ordinary
    requests for V answer exactly as before (the cache holds no A-computed blocks under V's hashes)."""
    run = cluster_factory(tiny_dir, prefill=1, decode=1)

    async def answers() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=60) as client:
            model = await model_id(client, run.url)
            return [(await chat_token_ids(client, run.url, model, "victim prompt " * 6, 8, False))[0] for _ in range(2)]

    async def poison() -> grpc.StatusCode | list[int]:
        a = list(range(3, 67))
        v = list(range(100, 164))
        resp = await _prefill(run.prefill[0], "attacker", a)
        try:
            return await _decode(run.decode[0], "poison", resp.handle, v, resp.first_token)
        finally:
            await _release(run.prefill[0], resp.handle)

    before = asyncio.run(answers())
    assert asyncio.run(poison()) == grpc.StatusCode.PERMISSION_DENIED
    assert asyncio.run(answers()) == before


@pytest.mark.parametrize("address", ["10.255.255.1:50051", "example.com:443"])
def test_a_decode_worker_never_dials_an_address_a_request_names(cluster_factory, tiny_dir, address):
    run = cluster_factory(tiny_dir, prefill=1, decode=1)

    async def main() -> None:
        prompt = list(range(40))
        resp = await _prefill(run.prefill[0], "real", prompt)
        evil = types_pb2.KVHandle()
        evil.CopyFrom(resp.handle)
        evil.transfer_endpoint = address
        t0 = time.monotonic()
        assert await _decode(run.decode[0], "dial", evil, prompt, resp.first_token) == grpc.StatusCode.PERMISSION_DENIED
        assert time.monotonic() - t0 < 5  # refused at once, not after a connection attempt
        assert (await worker_stats(run.decode[0])).free_blocks == (await worker_stats(run.decode[0])).total_blocks
        assert await _release(run.prefill[0], resp.handle) is True

    asyncio.run(main())


def test_a_bad_first_token_fails_only_its_own_request(cluster_factory, tiny_dir):
    run = cluster_factory(tiny_dir, prefill=1, decode=1)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            model = await model_id(client, run.url)
            honest = asyncio.create_task(chat_token_ids(client, run.url, model, "count to ten " * 4, 40, True))
            prompt = list(range(40))
            resp = await _prefill(run.prefill[0], "bad-first", prompt)
            got = await _decode(run.decode[0], "bad-first", resp.handle, prompt, 10**6)
            assert got == grpc.StatusCode.INVALID_ARGUMENT
            await _release(run.prefill[0], resp.handle)
            ids, _ = await honest
            assert len(ids) == 40

    asyncio.run(main())
