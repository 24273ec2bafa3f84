"""The engine's batching, caching, chunking and preemption must not change greedy tokens."""

import random

import pytest

from tests.helpers import (
    assert_no_leaks,
    generate_alone,
    greedy,
    run_to_completion,
    tiny_engine,
    tiny_model,
    tokens_of,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(250) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_batched_decode_matches_each_alone(model):
    ps = prompts(12)
    alone = [generate_alone(model, p, greedy(16)) for p in ps]
    engine = tiny_engine(model, max_num_batched_tokens=512)
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, greedy(16))
    outs = run_to_completion(engine)
    assert [tokens_of(outs[f"r{i}"]) for i in range(len(ps))] == alone
    assert_no_leaks(engine)


def test_requests_joining_a_running_batch_match_alone(model):
    ps = prompts(6, seed=1)
    alone = [generate_alone(model, p, greedy(10)) for p in ps]
    engine = tiny_engine(model)
    outs: dict[str, list] = {}
    for i, p in enumerate(ps):  # one new request every two steps: continuous batching
        engine.add_request(f"r{i}", p, greedy(10))
        for _ in range(2):
            for o in engine.step():
                outs.setdefault(o.request_id, []).append(o)
    for rid, o in run_to_completion(engine).items():
        outs.setdefault(rid, []).extend(o)
    assert [tokens_of(outs[f"r{i}"]) for i in range(len(ps))] == alone
    assert_no_leaks(engine)


def test_prefix_cache_hit_matches_cold_run(model):
    shared = prompts(1, seed=2, lo=30, hi=30)[0]
    a, b = shared + [1, 2, 3], shared + [7, 8]
    cold_b = generate_alone(model, b, greedy(12))
    engine = tiny_engine(model)
    engine.add_request("a", a, greedy(12))
    run_to_completion(engine)
    engine.add_request("b", b, greedy(12))
    outs = run_to_completion(engine)
    assert outs["b"][-1].num_cached_tokens == 28  # 7 full blocks of 4 of the shared 30 tokens
    assert tokens_of(outs["b"]) == cold_b
    # the identical prompt again: everything but the last block comes from the cache
    engine.add_request("b2", b, greedy(12))
    outs = run_to_completion(engine)
    assert tokens_of(outs["b2"]) == cold_b and outs["b2"][-1].num_cached_tokens == 28
    assert engine.blocks.num_cached_blocks > 0
    assert_no_leaks(engine)


def test_chunked_prefill_matches_one_shot(model):
    p = prompts(1, seed=3, lo=150, hi=150)[0]
    one_shot = generate_alone(model, p, greedy(12), max_num_batched_tokens=512)
    engine = tiny_engine(model, max_num_batched_tokens=16)
    engine.add_request("c", p, greedy(12))
    steps_before = engine.num_steps
    assert tokens_of(run_to_completion(engine)["c"]) == one_shot
    assert engine.num_steps - steps_before >= 150 // 16 + 11
    assert_no_leaks(engine)


def test_long_prompt_does_not_stall_running_decodes(model):
    engine = tiny_engine(model, max_num_batched_tokens=20)
    engine.add_request("short", [5, 6, 7], greedy(30))
    engine.step()
    engine.add_request("long", prompts(1, seed=4, lo=200, hi=200)[0], greedy(2))
    decoded_while_long_prefills = 0
    while engine.seqs.get("long") and not engine.seqs["long"].output_token_ids:
        outs = engine.step()
        decoded_while_long_prefills += sum(o.request_id == "short" for o in outs)
    assert decoded_while_long_prefills >= 9  # one token per step while 200 tokens go by in chunks
    run_to_completion(engine)
    assert_no_leaks(engine)


def test_preemption_recomputes_and_keeps_tokens(model):
    ps = prompts(6, seed=5, lo=10, hi=20)
    alone = [generate_alone(model, p, greedy(24)) for p in ps]
    engine = tiny_engine(model, num_kv_blocks=24, max_num_batched_tokens=256)
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, greedy(24))
    outs = run_to_completion(engine)
    assert [tokens_of(outs[f"r{i}"]) for i in range(len(ps))] == alone
    assert engine.scheduler.waiting == type(engine.scheduler.waiting)()
    assert_no_leaks(engine)


def test_preemption_actually_happens_under_pressure(model):
    engine = tiny_engine(model, num_kv_blocks=24, max_num_batched_tokens=256)
    seqs = []
    for i, p in enumerate(prompts(6, seed=5, lo=10, hi=20)):
        engine.add_request(f"r{i}", p, greedy(24))
        seqs.append(engine.seqs[f"r{i}"])
    run_to_completion(engine)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert_no_leaks(engine)


def test_seeded_sampling_does_not_depend_on_batch(model):
    p = [3, 1, 4, 1, 5, 9, 2, 6]
    params = greedy(12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = generate_alone(model, p, params)
    engine = tiny_engine(model)
    engine.add_request("x", p, params)
    for i, q in enumerate(prompts(5, seed=6)):
        engine.add_request(f"other{i}", q, greedy(12, temperature=1.0))
    assert tokens_of(run_to_completion(engine)["x"]) == alone
    assert_no_leaks(engine)
