import pytest

from common.engine.sampling import SamplingParams
from common.engine.sequence import Sequence
from common.errors import CacheFullError
from common.kv.block_hash import block_hashes, model_salt, root_hash
from common.kv.block_manager import BlockManager
from tests.helpers import assert_no_leaks, run_to_completion, tiny_engine


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams())


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    s.num_computed_tokens = len(s)
    bm.commit(s)
    return s


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(8, 4)
    a = seq("a", list(range(10)))
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(a)
    assert bm.leaks() == [] and bm.num_free_blocks == 8
    bm.check_consistency()


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    bm2 = BlockManager(16, 4)
    a = seq("a", list(range(12)))
    bm2.allocate(a)
    computed(bm2, a)
    assert bm2.num_cached_blocks == 3
    b = seq("b", list(range(12)))
    bm2.allocate(b)
    # 12 tokens = 3 full blocks, but the last must be recomputed to produce logits
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm2.blocks[a.block_table[0]].ref_count == 2
    bm2.free(a)
    bm2.free(b)
    assert bm2.leaks() == []
    bm2.check_consistency()


def test_hit_is_confirmed_against_token_ids():
    bm = BlockManager(8, 4)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a)
    computed(bm, a)
    bid = a.block_table[0]
    bm.blocks[bid].token_ids = (9, 9, 9, 9)  # simulate a hash collision
    assert bm.match_prefix([1, 2, 3, 4, 5]) == []
    bm.free(a)


def test_lru_eviction_prefers_uncached_then_oldest_and_logs_events():
    bm = BlockManager(4, 2)
    a = seq("a", [1, 2, 3, 4, 5])  # 2 full blocks cached + 1 partial
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    stored = [e for e in bm.events.since(0) if e.kind == "stored"]
    assert len(stored) == 2 and stored[1].parent_hash == stored[0].block_hash
    # 2 uncached blocks are free: a 4-token request takes them without evicting
    b = seq("b", [7, 8, 9, 10])
    bm.allocate(b)
    assert bm.num_cached_blocks == 2
    # the next allocation must evict; the tail block of `a` (freed first) goes first
    c = seq("c", [11, 12])
    bm.allocate(c)
    removed = [e for e in bm.events.since(0) if e.kind == "removed"]
    assert [e.block_hash for e in removed] == [stored[1].block_hash]
    assert [e.seq for e in bm.events.since(0)] == list(range(1, bm.events.last_seq + 1))
    for s in (b, c):
        bm.free(s)
    bm.check_consistency()
    assert bm.leaks() == []


def test_can_allocate_counts_shared_blocks_in_use():
    bm = BlockManager(4, 2)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a)  # 3 blocks
    computed(bm, a)
    b = seq("b", [1, 2, 3, 4, 6])  # shares 2 blocks in use, needs 1 new; 1 free
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert not bm.can_allocate(seq("c", [50, 51, 52]))
    bm.free(a)
    bm.free(b)
    assert bm.leaks() == []


def test_double_free_is_an_error():
    bm = BlockManager(4, 2)
    ids = bm.allocate_blocks(2)
    bm.free_blocks(ids)
    with pytest.raises(RuntimeError, match="double free"):
        bm.free_blocks(ids)


def test_allocate_blocks_beyond_capacity_raises():
    bm = BlockManager(2, 2)
    with pytest.raises(CacheFullError):
        bm.allocate_blocks(3)
    assert bm.leaks() == []


def test_a_cache_salt_shares_blocks_only_within_itself():
    """Tenant isolation: the same prompt under another salt finds nothing cached (no hit, no
    cached_tokens signal), and under its own salt finds everything."""

    engine = tiny_engine()
    prompt = list(range(1, 50))
    outs = {}
    for rid, salt in (("a1", "tenant-a"), ("b1", "tenant-b"), ("a2", "tenant-a"), ("n1", "")):
        engine.add_request(rid, prompt, SamplingParams.create(max_tokens=2, cache_salt=salt))
        outs.update(run_to_completion(engine))
    cached = {rid: outs[rid][-1].num_cached_tokens for rid in ("a1", "b1", "a2", "n1")}
    assert cached == {"a1": 0, "b1": 0, "a2": 48, "n1": 0}
    assert root_hash("") == 0 and root_hash("tenant-a") != root_hash("tenant-b")
    assert block_hashes(prompt, 16, "tenant-a")[0] != block_hashes(prompt, 16)[0]
    assert_no_leaks(engine)


def test_each_models_chains_start_from_a_root_of_its_own():
    """A worker serving several models reports every model's blocks on one stream: an engine hashes
    its blocks in its model's namespace, the one the gateway computes for that model."""
    a, b = tiny_engine(), tiny_engine()
    b.blocks.namespace = "another-model"
    prompt = list(range(1, 50))
    for engine in (a, b):
        engine.add_request("r", prompt, SamplingParams.create(max_tokens=2))
        run_to_completion(engine)
        want = block_hashes(prompt, engine.blocks.block_size, model_salt(engine.blocks.namespace))
        assert want and set(want) <= set(engine.blocks.cached_block_hashes())  # the output's blocks too
        assert_no_leaks(engine)
    assert a.blocks.namespace == a.layout.model_id
    assert not set(a.blocks.cached_block_hashes()) & set(b.blocks.cached_block_hashes())


def test_freed_uncached_blocks_are_reused_first_in_ascending_order():
    """The cache's memory is committed only as blocks are used: a freed block is taken again
    before one never touched, and a freed run comes back as the same ascending run."""
    bm = BlockManager(num_blocks=16, block_size=4)
    first = bm.allocate_blocks(3)
    second = bm.allocate_blocks(2)
    bm.free_blocks(first)
    again = bm.allocate_blocks(3)
    assert again == first == [0, 1, 2]
    bm.free_blocks(again + second)
    assert bm.leaks() == [] and bm.num_free_blocks == 16
    bm.check_consistency()
