"""The one chained block hash of kvrelay.

Every full KV block is identified by a 64-bit digest of (parent block's hash, the block's token ids).
Workers use it to find cached prefixes; the gateway computes the same values from the tokenized
prompt to route requests to the worker that already holds them. It must be identical in every
process and on every host, so it is built on blake2b over a fixed little-endian encoding, never on
Python's salted `hash()`. This module is deliberately free of torch so the gateway can import it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# The hash of "no parent": the first block of every unsalted sequence chains from this.
ROOT_HASH = 0


def root_hash(cache_salt: str = "") -> int:
    """Where a sequence's chain starts. A cache salt (a tenant's) starts it elsewhere, so blocks of
    one salt never match another's: no cache hit, no timing or cached_tokens signal across them."""
    if not cache_salt:
        return ROOT_HASH
    return int.from_bytes(
        hashlib.blake2b(b"kvrelay-cache-salt\x00" + cache_salt.encode(), digest_size=8).digest(), "little"
    )


def model_salt(model_id: str, cache_salt: str = "") -> str:
    """What starts `model_id`'s chains under a cache salt: a worker serving several models reports all
    their blocks on one event stream, and the same tokens must not look cached for another model.
    Engines apply it with their own model id; gateways with the id of the model they route to."""
    return f"{model_id}\x00{cache_salt}" if model_id else cache_salt


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Digest of one full block given its parent's digest."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str = "") -> list[int]:
    """Chained digests of every *full* block of `token_ids`; a partial tail block has none."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    parent = root_hash(cache_salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
