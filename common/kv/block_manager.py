"""Block accounting for the paged KV cache, with automatic prefix caching.

Each block has a reference count. A full block whose K/V are computed gets its chained hash
registered, so later sequences with the same prefix share it. Blocks whose count drops to zero
go to one of two free lists: never-hashed blocks are reused first; hashed ones stay cached in
LRU order and are evicted (their hash forgotten, a "removed" event logged) only when nothing
else is free. A hit is confirmed against the stored token ids, not the hash alone.

Questions (`can_allocate`, `can_append`) never change state; the matching actions do.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

from common.errors import CacheFullError
from common.kv.block_hash import ROOT_HASH, hash_block, model_salt, root_hash
from common.kv.events import KVEventLog


class _Params(Protocol):
    cache_salt: str


class BlockOwner(Protocol):
    """What the block manager reads and writes of a request (the engine's Sequence is one): the
    cache layer knows nothing else of the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: _Params
    block_table: list[int]
    block_hashes: list[int]
    num_computed_tokens: int
    num_cached_tokens: int
    num_preemptions: int

    @property
    def token_ids(self) -> list[int]: ...

    def __len__(self) -> int: ...


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, events: KVEventLog | None = None, namespace: str = "") -> None:
        """`namespace`: the model's id; its chains start from a root of their own, so a worker serving
        several models reports blocks that never collide, and gateways compute the same hashes."""
        self.namespace = namespace
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed, LRU first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.events = events or KVEventLog()
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0  # of which found

    # -- questions ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take, evicting cached ones if needed."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_block_hashes(self) -> list[int]:
        return list(self._cached)

    def match_prefix(self, token_ids: list[int], root: int = ROOT_HASH) -> list[int]:
        """Block ids of the longest cached prefix of full blocks, leaving at least one token to compute.
        `root`: where the chain starts (a cache salt's, see block_hash.root_hash)."""
        bs = self.block_size
        hits: list[int] = []
        parent = root
        for i in range((len(token_ids) - 1) // bs):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = hash_block(parent, chunk)
            bid = self._cached.get(parent)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            hits.append(bid)
        return hits

    def _root(self, seq: BlockOwner) -> int:
        return root_hash(model_salt(self.namespace, seq.params.cache_salt))

    def can_allocate(self, seq: BlockOwner) -> bool:
        hits = self.match_prefix(seq.token_ids, self._root(seq))
        shared_in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return self.blocks_for(len(seq)) - shared_in_use <= self.num_free_blocks

    def can_append(self, seq: BlockOwner) -> bool:
        return self.blocks_for(len(seq)) - len(seq.block_table) <= self.num_free_blocks

    # -- actions --------------------------------------------------------------------------------
    def allocate(self, seq: BlockOwner) -> None:
        """Give `seq` blocks for all its tokens, reusing its cached prefix."""
        if seq.block_table:
            raise RuntimeError(f"request {seq.request_id!r} already holds blocks")
        tokens = seq.token_ids
        hits = self.match_prefix(tokens, self._root(seq))
        hashes: list[int] = []
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._evictable[bid]
            block.ref_count += 1
            hashes.append(block.block_hash)  # type: ignore[arg-type]
        seq.block_table = hits + [self._take() for _ in range(self.blocks_for(len(tokens)) - len(hits))]
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
            self.prefix_queries += len(seq.prompt_token_ids)
            self.prefix_hits += seq.num_computed_tokens

    def append_slots(self, seq: BlockOwner) -> None:
        """Grow the block table to cover every token of `seq`."""
        for _ in range(self.blocks_for(len(seq)) - len(seq.block_table)):
            seq.block_table.append(self._take())

    def allocate_blocks(self, n: int) -> list[int]:
        """n fresh blocks (ref 1) for KV arriving from elsewhere."""
        if n > self.num_free_blocks:
            raise CacheFullError(f"need {n} KV blocks, {self.num_free_blocks} free")
        return [self._take() for _ in range(n)]

    def commit(self, seq: BlockOwner) -> None:
        """Register the hashes of blocks that became full and computed since the last commit."""
        bs = self.block_size
        tokens = seq.token_ids
        root = self._root(seq)
        parent = seq.block_hashes[-1] if seq.block_hashes else root
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            parent = hash_block(parent, chunk)
            seq.block_hashes.append(parent)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and parent not in self._cached:
                block.block_hash, block.token_ids = parent, chunk
                self._cached[parent] = block.block_id
                prev = seq.block_hashes[-2] if len(seq.block_hashes) > 1 else root
                self.events.append("stored", parent, prev)

    def free(self, seq: BlockOwner) -> None:
        self.free_blocks(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []

    def free_blocks(self, block_ids: list[int]) -> None:
        # Tail first, so a sequence's last blocks are the first evicted and its prefix lives longest.
        for bid in reversed(block_ids):
            block = self.blocks[bid]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {bid}")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:  # reused first, in ascending order: the cache's memory
                    self._free.appendleft(bid)  # becomes resident only as far as blocks are in use
                else:
                    self._evictable[bid] = None

    def _take(self) -> int:
        if self._free:
            bid = self._free.popleft()
        elif self._evictable:
            bid, _ = self._evictable.popitem(last=False)
            block = self.blocks[bid]
            del self._cached[block.block_hash]  # type: ignore[arg-type]
            self.events.append("removed", block.block_hash)  # type: ignore[arg-type]
            block.block_hash, block.token_ids = None, ()
        else:
            raise CacheFullError("no free KV blocks (callers must ask can_allocate/can_append first)")
        self.blocks[bid].ref_count = 1
        return bid

    # -- invariants -----------------------------------------------------------------------------
    def leaks(self) -> list[int]:
        """Ids of blocks still referenced. Empty when every request has released its blocks."""
        return [b.block_id for b in self.blocks if b.ref_count != 0]

    def check_consistency(self) -> None:
        """Raise if the free lists, reference counts and hash index disagree."""
        free, evictable = set(self._free), set(self._evictable)
        if free & evictable:
            raise RuntimeError(f"blocks on both free lists: {sorted(free & evictable)}")
        for b in self.blocks:
            on_list = b.block_id in free or b.block_id in evictable
            if on_list != (b.ref_count == 0):
                raise RuntimeError(f"block {b.block_id}: ref count {b.ref_count} but on free list: {on_list}")
            if b.block_hash is not None and self._cached.get(b.block_hash) != b.block_id:
                raise RuntimeError(f"block {b.block_id} carries a hash the index does not map to it")
        if len(self._cached) != sum(b.block_hash is not None for b in self.blocks):
            raise RuntimeError("hash index and blocks disagree on the number of cached blocks")
