"""The registry against a real redis-server: records, heartbeats and expiry, discovery, and KV
events over Redis Streams (including a gap that forces a resync from the worker's snapshot)."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from common.discovery.announcer import Announcer
from common.discovery.event_stream import EventPublisher, decode_entry, encode_entry
from common.discovery.record import RegistryKeys, WorkerRecord
from common.discovery.redis_client import RegistryUnavailableError, check_redis, open_redis
from common.engine.async_engine import AsyncEngine
from common.kv.events import KVEvent
from common.rpc import worker_pb2_grpc
from common.rpc.channels import ChannelPool
from common.serving.model_pool import ModelPool
from common.serving.worker_servicer import WorkerIdentity, WorkerServicer
from gateway.discovery import Member, RedisDiscovery
from gateway.kv_event_stream import RedisKVEventWatcher
from gateway.scheduling.prefix_index import PrefixIndex
from kvrelay.launcher import free_port
from tests.helpers import assert_no_leaks, greedy, tiny_engine
from tests.waiting import async_wait_for

KEYS = RegistryKeys("test")


def record(worker_id: str = "d1", role: str = "decode", address: str = "127.0.0.1:1") -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        role=role,
        address=address,
        model_id="tiny",
        layout={"model_id": "tiny", "dtype": "float32", "block_size": 4},
        total_blocks=128,
        max_model_len=512,
        transfer_backends=["grpc"],
        incarnation="abc",
        started_at=time.time(),
        events_stream=KEYS.events(worker_id, "abc"),
    )


def test_record_round_trip_and_validation():
    r = record()
    assert WorkerRecord.decode(r.encode()) == r
    with pytest.raises(ValueError, match="role"):
        WorkerRecord.decode(r.encode().replace(b'"decode"', b'"router"'))


def test_event_entry_round_trip():
    events = [KVEvent(7, "stored", 2**64 - 1), KVEvent(8, "removed", 5), KVEvent(9, "cleared", 0)]
    assert decode_entry(encode_entry(events)) == events
    with pytest.raises(ValueError, match="malformed"):
        decode_entry({b"first": b"1", b"kinds": b"ss", b"hashes": b"\0" * 8})


def test_heartbeat_keeps_the_record_and_deregister_removes_it(redis_url):
    async def run() -> None:
        client = open_redis(redis_url)
        ann = Announcer(client, record(), KEYS, ttl_s=0.6, interval_s=0.15)
        await ann.register()
        await asyncio.sleep(1.2)  # two TTLs: only heartbeats keep it
        assert WorkerRecord.decode(await client.get(KEYS.worker("d1"))).worker_id == "d1"
        assert 0 < await client.pttl(KEYS.worker("d1")) <= 600
        assert await client.smembers(KEYS.index) == {b"d1"}  # how gateways find it, without a SCAN
        await ann.deregister()
        assert await client.get(KEYS.worker("d1")) is None
        assert not await client.smembers(KEYS.index)
        await client.aclose()

    asyncio.run(run())


def test_a_worker_that_dies_expires(redis_url):
    async def run() -> None:
        client = open_redis(redis_url)
        ann = Announcer(client, record(), KEYS, ttl_s=0.5, interval_s=0.1)
        await ann.register()
        ann._task.cancel()  # the process died: no deregistration, no more heartbeats
        assert await client.exists(KEYS.worker("d1"))
        await asyncio.sleep(0.7)
        assert not await client.exists(KEYS.worker("d1"))
        await client.aclose()

    asyncio.run(run())


def test_heartbeat_must_be_shorter_than_ttl(redis_url):
    with pytest.raises(ValueError, match="shorter than the TTL"):
        Announcer(open_redis(redis_url), record(), KEYS, ttl_s=1.0, interval_s=1.0)


def test_discovery_lists_live_records_and_survives_an_outage(redis_url):
    async def run() -> None:
        client = open_redis(redis_url)
        await client.set(KEYS.worker("p1"), record("p1", "prefill", "127.0.0.1:2").encode())
        await client.set(KEYS.worker("d1"), record("d1").encode())
        await client.set(KEYS.worker("bad"), b'{"worker_id": "bad"}')  # malformed: ignored
        await client.set(KEYS.worker("gone"), record("gone").encode(), px=1)  # expires before it is read
        await client.sadd(KEYS.index, "p1", "d1", "bad", "gone")
        await client.set("other:worker:x", record("x").encode())  # another deployment's prefix
        await client.sadd("other:workers", "x")
        await asyncio.sleep(0.01)
        disc = RedisDiscovery(client, KEYS, prefill=[], decode=["127.0.0.1:9"])
        got = await disc.members()
        assert {(m.role, m.address) for m in got} == {
            ("prefill", "127.0.0.1:2"),
            ("decode", "127.0.0.1:1"),
            ("decode", "127.0.0.1:9"),
        }
        assert Member("decode", "127.0.0.1:1", KEYS.events("d1", "abc")) in got
        assert await client.smembers(KEYS.index) == {b"p1", b"d1", b"bad"}  # the expired one left the index
        await client.shutdown(nosave=True)  # the registry goes away: the last known set is kept
        assert {m.address for m in await disc.members()} == {m.address for m in got}
        await disc.close()

    asyncio.run(run())


def test_unreachable_registry_is_a_clear_error():
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def run() -> None:
        client = open_redis(url)
        with pytest.raises(RegistryUnavailableError, match=f"cannot reach the registry at {url}"):
            await check_redis(client, url)
        await client.aclose()

    asyncio.run(run())
    with pytest.raises(ValueError, match="must start with redis://"):
        open_redis("http://localhost:6379")


def test_kv_events_through_redis_follow_the_cache_and_resync_after_a_gap(redis_url):
    """A real engine publishes its KV events to a stream; the gateway-side watcher mirrors the cache.
    Then events are lost (the stream trimmed while no watcher ran): the next watcher detects the gap,
    takes a snapshot over gRPC and ends up with the engine's exact set of cached hashes."""
    engine = tiny_engine()
    runner = AsyncEngine(engine)
    port = free_port()
    stream = KEYS.events("w1", "abc")

    async def run() -> None:
        pool = ModelPool([])
        pool.adopt(runner)
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(pool, WorkerIdentity("w1", "prefill", f"127.0.0.1:{port}", ("grpc",))), server
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        client = open_redis(redis_url)
        pub = EventPublisher(client, engine.events, stream, 60_000)
        publisher = asyncio.create_task(pub.run())
        channels = ChannelPool()
        index = PrefixIndex()

        async def serve(prompt: list[int]) -> None:
            async for _ in runner.generate(f"r{prompt[0]}", prompt, greedy(2)):
                pass

        async def mirrors() -> bool:
            want = set(await runner.call(engine.blocks.cached_block_hashes))
            return not index.needs_snapshot("w1") and index._views["w1"].hashes == want

        async def all_published() -> bool:
            return pub.published_seq == engine.events.last_seq

        try:
            watcher = RedisKVEventWatcher(channels, index, client)
            watcher.watch("w1", f"127.0.0.1:{port}", stream)
            await serve(list(range(1, 30)))
            await async_wait_for(mirrors, 30, "the index to mirror the worker's cache")
            assert watcher.resyncs == 0
            followers = [task for _, task in watcher._tasks.values()]
            await watcher.stop()  # this reader stops (for sure: nothing reads the stream now)...
            assert followers and all(t.done() for t in followers) and not watcher.watching()

            seen = index.last_seq("w1")  # ...and its index view stays, current to this seq
            await serve(list(range(40, 70)))
            await async_wait_for(all_published, 30, "the publisher to publish every event")
            assert index.last_seq("w1") == seen < engine.events.last_seq
            await client.xtrim(stream, maxlen=0)  # the events after `seen` are lost
            await serve(list(range(80, 110)))

            watcher = RedisKVEventWatcher(channels, index, client)
            watcher.watch("w1", f"127.0.0.1:{port}", stream)
            await async_wait_for(mirrors, 30, "the index to mirror the cache after the gap")
            assert watcher.resyncs == 1
            await watcher.stop()
        finally:
            publisher.cancel()
            await channels.close()
            await server.stop(None)
            await client.aclose()

    try:
        asyncio.run(run())
    finally:
        runner.shutdown()
    assert_no_leaks(engine)


def test_records_of_one_model_verify_for_readers_before_and_after_the_models_field():
    secret = b"s" * 32
    old = WorkerRecord(
        worker_id="w1",
        role="decode",
        address="127.0.0.1:1",
        model_id="m",
        layout={},
        total_blocks=1,
        max_model_len=16,
        transfer_backends=["grpc"],
        incarnation="i",
        started_at=1.0,
    ).signed(secret)
    as_old_writer_signed = json.loads(old.encode())
    as_old_writer_signed.pop("models")  # what a worker from before the field wrote
    assert WorkerRecord.decode(json.dumps(as_old_writer_signed)).verified(secret)
    one = old.model_copy(update={"models": ["m"]}).signed(secret)
    assert one.signature == old.signature  # one model: signed as before
    two = old.model_copy(update={"models": ["m", "n"]}).signed(secret)
    assert two.signature != old.signature and two.verified(secret)
    assert not two.model_copy(update={"models": ["m", "x"]}).verified(secret)
