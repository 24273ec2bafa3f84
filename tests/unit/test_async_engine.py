"""The asyncio front of the engine: streaming, cancellation, and a loop that survives failures."""

import asyncio

import pytest

from common.engine.async_engine import AsyncEngine
from common.errors import InvalidRequestError
from tests.helpers import assert_no_leaks, generate_alone, greedy, tiny_engine, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], max_tokens: int) -> list[int]:
    return [t async for o in engine.generate(rid, prompt, greedy(max_tokens)) for t in o.new_token_ids]


def test_concurrent_streams_match_alone(model):
    prompts = [[i + 1, i + 2, i + 3, 7 * i % 250] for i in range(8)]
    expected = [generate_alone(model, p, greedy(10)) for p in prompts]

    async def main():
        engine = AsyncEngine(tiny_engine(model))
        try:
            got = await asyncio.gather(*(collect(engine, f"r{i}", p, 10) for i, p in enumerate(prompts)))
            await engine.call(lambda: None)
            return got, engine
        finally:
            engine.shutdown()

    got, engine = asyncio.run(main())
    assert got == expected
    assert_no_leaks(engine.engine)


def test_consumer_leaving_early_aborts_and_frees(model):
    async def main():
        engine = AsyncEngine(tiny_engine(model))
        try:
            async for out in engine.generate("r", [1, 2, 3, 4, 5], greedy(200)):
                assert out.new_token_ids
                break  # the client went away
            for _ in range(100):
                if not (await engine.stats())["running"]:
                    break
                await asyncio.sleep(0.01)
            return engine
        finally:
            engine.shutdown()

    assert_no_leaks(asyncio.run(main()).engine)


def test_bad_request_raises_and_others_carry_on(model):
    async def main():
        engine = AsyncEngine(tiny_engine(model))
        try:
            good = asyncio.create_task(collect(engine, "good", [1, 2, 3], 20))
            with pytest.raises(InvalidRequestError):
                await collect(engine, "bad", [], 5)
            return await good, engine
        finally:
            engine.shutdown()

    tokens, engine = asyncio.run(main())
    assert len(tokens) == 20
    assert_no_leaks(engine.engine)


def test_a_failing_step_fails_its_requests_not_the_loop(model):
    async def main():
        engine = AsyncEngine(tiny_engine(model))
        real_run = engine.engine.runner.run
        calls = {"n": 0}

        def flaky(batch):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected fault")
            return real_run(batch)

        engine.engine.runner.run = flaky
        try:
            outs = [o async for o in engine.generate("victim", [1, 2, 3], greedy(10))]
            after = await collect(engine, "survivor", [4, 5, 6], 5)
            return outs, after, engine
        finally:
            engine.shutdown()

    outs, after, engine = asyncio.run(main())
    assert outs[-1].finish_reason == "error" and "injected fault" in outs[-1].error
    assert len(after) == 5
    assert_no_leaks(engine.engine)


def test_explicit_abort_ends_the_stream(model):
    async def main():
        engine = AsyncEngine(tiny_engine(model))
        try:
            outs = []
            async for out in engine.generate("r", [1, 2, 3], greedy(400)):
                outs.append(out)
                if len(outs) == 2:
                    assert await engine.abort("r")
            return outs, engine
        finally:
            engine.shutdown()

    outs, engine = asyncio.run(main())
    assert outs[-1].finish_reason == "abort"
    assert_no_leaks(engine.engine)
