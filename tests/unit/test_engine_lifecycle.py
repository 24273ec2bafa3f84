"""Cancellation, prefill-only pinning and leases, KV export/import, and stop conditions."""

import pytest

from common.errors import UnknownRequestError
from tests.helpers import (
    assert_no_leaks,
    generate_alone,
    greedy,
    run_to_completion,
    tiny_engine,
    tiny_model,
    tokens_of,
)

PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 10, 20]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_abort_frees_blocks_at_once(model):
    engine = tiny_engine(model)
    engine.add_request("a", PROMPT, greedy(50))
    engine.add_request("b", PROMPT[:5], greedy(50))
    engine.step()
    engine.step()
    assert engine.blocks.num_used_blocks > 0
    assert engine.abort("a") and engine.abort("b")
    assert not engine.abort("a")
    assert not engine.has_unfinished()
    assert_no_leaks(engine)


def test_abort_of_waiting_request(model):
    engine = tiny_engine(model)
    engine.add_request("w", PROMPT, greedy(5))
    assert engine.abort("w")
    assert engine.step() == []
    assert_no_leaks(engine)


def test_prefill_only_pins_then_release_frees(model):
    engine = tiny_engine(model, lease_seconds=30)
    engine.add_request("p", PROMPT, greedy(8), prefill_only=True)
    outs = run_to_completion(engine)["p"]
    assert len(outs) == 1 and outs[0].pinned and not outs[0].finished
    export = engine.handoff.export("p")
    assert export.num_tokens == len(PROMPT)
    assert len(export.block_ids) == engine.blocks.blocks_for(len(PROMPT))
    assert engine.blocks.num_used_blocks == len(export.block_ids)
    assert engine.handoff.release("p")
    assert not engine.handoff.release("p")
    with pytest.raises(UnknownRequestError):
        engine.handoff.export("p")
    assert engine.blocks.num_used_blocks == len(export.block_ids)  # freed by the engine thread's turn:
    assert engine.handoff.settle() == ["p"]
    assert_no_leaks(engine)


def test_lease_expiry_frees_pinned_blocks(model):
    engine = tiny_engine(model, lease_seconds=5)
    engine.add_request("p", PROMPT, greedy(8), prefill_only=True)
    run_to_completion(engine)
    deadline = engine.handoff.next_deadline()
    assert deadline is not None
    assert engine.handoff.settle(now=deadline - 1) == []
    assert engine.handoff.settle(now=deadline) == ["p"]
    assert_no_leaks(engine)


def test_prefill_only_that_finishes_at_once_does_not_pin(model):
    engine = tiny_engine(model)
    engine.add_request("p", PROMPT, greedy(1), prefill_only=True)
    out = run_to_completion(engine)["p"][0]
    assert out.finished and out.finish_reason == "length" and not out.pinned
    assert_no_leaks(engine)


def test_export_import_between_engines_matches_single_engine(model):
    """What the disaggregated path does, in-process: prefill on A, copy blocks, decode on B."""
    params = greedy(16)
    expected = generate_alone(model, PROMPT, params)
    prefill, decode = tiny_engine(model), tiny_engine(model, num_kv_blocks=64)
    prefill.add_request("r", PROMPT, params, prefill_only=True)
    first = run_to_completion(prefill)["r"][0].new_token_ids[0]
    export = prefill.handoff.export("r")
    dst = decode.handoff.begin_import("r", PROMPT, first, params)
    decode.cache.write_blocks(dst, prefill.cache.read_blocks(export.block_ids))
    assert prefill.handoff.release("r")
    assert prefill.handoff.settle() == ["r"]
    assert decode.finish_import("r") is None
    rest = tokens_of(run_to_completion(decode)["r"])
    assert [first, *rest] == expected
    # imported prompt blocks and decoded blocks are both registered for prefix reuse:
    # 11 prompt + 15 computed output tokens = 6 full blocks of 4
    assert decode.blocks.num_cached_blocks == 6
    assert_no_leaks(prefill)
    assert_no_leaks(decode)


def test_abort_during_import_frees_reserved_blocks(model):
    engine = tiny_engine(model)
    engine.handoff.begin_import("r", PROMPT, 5, greedy(4))
    assert engine.blocks.num_used_blocks == 3
    assert engine.abort("r")
    assert_no_leaks(engine)


def test_eos_stops_unless_ignored(model):
    engine = tiny_engine(model)
    tokens = generate_alone(model, PROMPT, greedy(20))
    stop_at = tokens[5]
    engine.add_request("s", PROMPT, greedy(20, stop_token_ids=[stop_at]))
    outs = run_to_completion(engine)["s"]
    assert outs[-1].finish_reason == "stop"
    assert tokens_of(outs) == tokens[: tokens.index(stop_at) + 1]
    assert_no_leaks(engine)


def test_max_tokens_gives_length(model):
    engine = tiny_engine(model)
    engine.add_request("m", PROMPT, greedy(7))
    outs = run_to_completion(engine)["m"]
    assert len(tokens_of(outs)) == 7 and outs[-1].finish_reason == "length"
    assert outs[-1].num_prompt_tokens == len(PROMPT) and outs[-1].num_output_tokens == 7
    assert_no_leaks(engine)


def test_context_window_end_gives_length(model):
    engine = tiny_engine(model, max_model_len=20)
    engine.add_request("c", PROMPT, greedy(50))
    outs = run_to_completion(engine)["c"]
    assert outs[-1].finish_reason == "length"
    assert len(PROMPT) + len(tokens_of(outs)) == 20
    assert_no_leaks(engine)


def test_block_events_follow_the_cache(model):
    engine = tiny_engine(model, num_kv_blocks=8)
    engine.add_request("a", list(range(1, 17)), greedy(2))
    run_to_completion(engine)
    stored = {e.block_hash for e in engine.events.since(0) if e.kind == "stored"}
    assert stored == set(engine.blocks.cached_block_hashes())
    engine.add_request("b", list(range(100, 130)), greedy(2))  # forces evictions
    run_to_completion(engine)
    live: set[int] = set()
    for e in engine.events.since(0):
        (live.add if e.kind == "stored" else live.discard)(e.block_hash)
    assert live == set(engine.blocks.cached_block_hashes())
    assert_no_leaks(engine)
