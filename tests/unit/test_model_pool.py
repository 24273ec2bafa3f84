"""A worker's model pool on real tiny models: loads on demand within a memory budget, evicts the
least recently used idle model, never one in use (a call inside it, or KV pinned for a pull)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.config import EngineConfig
from common.engine.sampling import SamplingParams
from common.serving.model_pool import ModelBusyError, ModelNotServedError, ModelPool
from tests.tiny_checkpoint import write_tiny_checkpoint
from tests.waiting import async_wait_for

KV_MB = 1


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("pool-models")
    return [str(write_tiny_checkpoint(root / f"tiny-{name}", seed=i)) for i, name in enumerate("abc")]


def _pool(specs: list[str], budget_models: float | None, timeout: float = 5.0) -> ModelPool:
    """A pool whose budget holds `budget_models` tiny models (None: no budget)."""
    config = EngineConfig(kv_cache_mb=KV_MB, threads=1)
    one = ModelPool(specs[:1], config)
    asyncio.run(one.preload())
    size = one.used_bytes()
    asyncio.run(one.shutdown())
    budget = int(size * budget_models) if budget_models else None
    return ModelPool(specs, config, budget_bytes=budget, load_timeout_s=timeout)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams.create(max_tokens=n, temperature=0.0)


async def _generate(pool: ModelPool, model: str, prompt: list[int], rid: str) -> list[int]:
    out: list[int] = []
    async with pool.use(model) as hosted:
        async for o in hosted.engine.generate(rid, prompt, _greedy(4)):
            out += o.new_token_ids
    return out


async def _assert_no_leaks(pool: ModelPool) -> None:
    for model_id, engine in pool.engines().items():
        s = await engine.stats()
        assert s["sequences"] == 0 and s["free_blocks"] == s["total_blocks"], (model_id, s)


def test_no_budget_preloads_every_model_and_serves_each(models):
    pool = _pool(models, None)

    async def run() -> None:
        await pool.preload()
        assert list(pool.loaded) == ["tiny-a", "tiny-b", "tiny-c"]
        a = await _generate(pool, "tiny-a", [5, 6, 7, 8], "r1")
        b = await _generate(pool, "tiny-b", [5, 6, 7, 8], "r2")
        assert len(a) == len(b) == 4 and a != b  # different weights, different answers
        assert await _generate(pool, "", [5, 6, 7, 8], "r3") == a  # no model named: the first
        await _assert_no_leaks(pool)
        await pool.shutdown()

    asyncio.run(run())


def test_budget_of_one_model_loads_on_demand_and_evicts_the_idle_one(models):
    pool = _pool(models[:2], 1.5)

    async def run() -> None:
        await pool.preload()
        assert list(pool.loaded) == ["tiny-a"]  # b does not fit beside it
        before = await _generate(pool, "tiny-a", list(range(3, 40)), "r1")  # fills a's prefix cache
        cached = set(await pool.engines()["tiny-a"].call(pool.engines()["tiny-a"].cached_block_hashes))
        seq = pool.events.last_seq
        await _generate(pool, "tiny-b", [9, 10, 11], "r2")
        assert list(pool.loaded) == ["tiny-b"]
        stats = {m["model_id"]: m for m in await pool.model_stats()}
        assert (stats["tiny-a"]["loads"], stats["tiny-a"]["evictions"], stats["tiny-a"]["loaded"]) == (1, 1, False)
        assert (stats["tiny-b"]["loads"], stats["tiny-b"]["evictions"], stats["tiny-b"]["loaded"]) == (1, 0, True)
        # Gateways are told that a's cached blocks are gone from this worker.
        removed = {e.block_hash for e in pool.events.since(seq) if e.kind == "removed"}
        assert cached and cached <= removed
        assert await _generate(pool, "tiny-a", list(range(3, 40)), "r3") == before  # reloaded: same answer
        assert pool.used_bytes() <= pool.budget_bytes
        await _assert_no_leaks(pool)
        await pool.shutdown()

    asyncio.run(run())


def test_least_recently_used_goes_first(models):
    pool = _pool(models, 2.5)

    async def run() -> None:
        await pool.preload(["tiny-a", "tiny-b"])
        await _generate(pool, "tiny-a", [1, 2, 3], "r1")  # a is now more recent than b
        await _generate(pool, "tiny-c", [1, 2, 3], "r2")
        assert set(pool.loaded) == {"tiny-a", "tiny-c"}
        await _assert_no_leaks(pool)
        await pool.shutdown()

    asyncio.run(run())


def test_a_model_in_use_is_never_evicted(models):
    pool = _pool(models[:2], 1.5, timeout=0.5)

    async def run() -> None:
        await pool.preload()
        async with pool.use("tiny-a"):  # a call is inside a
            with pytest.raises(ModelBusyError, match="held by models in use"):
                await _generate(pool, "tiny-b", [1, 2], "r1")
            assert list(pool.loaded) == ["tiny-a"]
        # KV pinned for a decode worker's pull holds the model too, after the call has ended.
        async with pool.use("tiny-a") as hosted:
            async for out in hosted.engine.generate("p1", list(range(20)), _greedy(4), prefill_only=True):
                assert out.pinned or not out.finished
        with pytest.raises(ModelBusyError):
            await _generate(pool, "tiny-b", [1, 2], "r2")
        await pool.engines()["tiny-a"].release("p1")
        await asyncio.sleep(0.1)  # the engine thread frees released blocks between steps
        assert len(await _generate(pool, "tiny-b", [1, 2], "r3")) == 4
        assert list(pool.loaded) == ["tiny-b"]
        await _assert_no_leaks(pool)
        await pool.shutdown()

    asyncio.run(run())


def test_unknown_and_unloaded_models_are_clear_errors(models):
    pool = _pool(models[:2], 1.5)

    async def run() -> None:
        await pool.preload()
        with pytest.raises(ModelNotServedError, match="does not serve model 'nope'.*tiny-a"):
            async with pool.use("nope"):
                pass
        with pytest.raises(ModelNotServedError, match="not loaded here"):  # KV calls never load a model
            async with pool.use("tiny-b", load=False):
                pass
        await pool.shutdown()

    asyncio.run(run())


def test_a_model_larger_than_the_budget_is_refused(models):
    pool = _pool(models[:1], 0.5)

    async def run() -> None:
        with pytest.raises(ModelBusyError, match="more than this worker's budget"):
            await pool.preload()

    asyncio.run(run())


def test_the_same_model_twice_is_a_configuration_error(models):
    with pytest.raises(ValueError, match="listed twice"):
        ModelPool([models[0], str(Path(models[0]))])


def test_concurrent_calls_share_one_load_and_a_cancelled_caller_does_not_stop_it(models):
    pool = _pool(models[:2], 1.5)

    async def run() -> None:
        await pool.preload()
        first = asyncio.create_task(_generate(pool, "tiny-b", [1, 2, 3], "r1"))
        await asyncio.sleep(0)  # the load has begun for `first`...
        first.cancel()  # ...whose client gives up
        results = await asyncio.gather(*(_generate(pool, "tiny-b", [1, 2, 3], f"r{i}") for i in range(2, 5)))
        assert all(len(r) == 4 for r in results)
        stats = {m["model_id"]: m for m in await pool.model_stats()}
        assert stats["tiny-b"]["loads"] == 1  # one load served all of them
        await _assert_no_leaks(pool)
        await pool.shutdown()

    asyncio.run(run())


def test_steady_traffic_to_one_model_does_not_starve_the_load_of_another(models):
    pool = _pool(models[:2], 1.5, timeout=20)

    async def run() -> None:
        await pool.preload()
        stop = asyncio.Event()

        served = [0, 0]

        async def steady(tag: int) -> int:  # back-to-back calls to a, always one in flight
            while not stop.is_set():
                await _generate(pool, "tiny-a", [1, 2, 3], f"a{tag}-{served[tag]}")
                served[tag] += 1
            return served[tag]

        async def flowing() -> bool:
            return all(served)

        traffic = [asyncio.create_task(steady(t)) for t in range(2)]
        await async_wait_for(flowing, what="steady traffic to a")
        assert len(await _generate(pool, "tiny-b", [4, 5, 6], "b")) == 4  # a stops taking calls, is evicted
        stop.set()
        assert all(n > 0 for n in await asyncio.gather(*traffic))  # a's callers were served, after b
        await _assert_no_leaks(pool)
        await pool.shutdown()

    asyncio.run(run())


def test_calls_to_an_unloaded_engine_fail_instead_of_waiting_forever(models):
    from common.errors import EngineStoppedError

    pool = _pool(models[:1], None)

    async def run() -> None:
        await pool.preload()
        engine = pool.engines()["tiny-a"]
        await pool.shutdown()
        with pytest.raises(EngineStoppedError):
            await engine.call(engine.cached_block_hashes)

    asyncio.run(run())


def test_a_repository_model_is_pinned_to_the_version_found_at_start(models, tmp_path, monkeypatch):
    from common.repository.store import ModelRepository

    monkeypatch.setenv("KVRELAY_MODEL_REPO", str(tmp_path / "repo"))
    repo = ModelRepository()
    repo.add(models[0], "tiny", version="1", progress=False)
    pool = ModelPool(["tiny"], EngineConfig(kv_cache_mb=KV_MB, threads=1))
    repo.add(models[1], "tiny", version="2", progress=False)  # added while the worker runs

    async def run() -> None:
        await pool.preload()
        v1 = pool.engines()["tiny"].layout
        assert pool.known["tiny"].spec == "tiny@1" and v1.weights
        await pool.shutdown()
        fresh = ModelPool(["tiny"], EngineConfig(kv_cache_mb=KV_MB, threads=1))
        await fresh.preload()
        v2 = fresh.engines()["tiny"].layout
        assert v2.model_id == v1.model_id and v2.weights != v1.weights  # never exchange KV across versions
        await fresh.shutdown()

    asyncio.run(run())
