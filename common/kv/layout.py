"""The description of a worker's KV cache that two workers compare before exchanging blocks.

torch-free on purpose: the gateway checks layout compatibility when it picks workers.

The weight format a worker serves (EngineConfig.quantization: none, fp16, int8) is not part of the
layout: the cache always holds K/V in the compute dtype, so workers with different weight formats
exchange blocks as they are (the K/V values differ only as much as their weights do).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from common.errors import KVRelayError

# Axis order of the cache tensor; one block is contiguous, so a block is one memory region.
BLOCK_MAJOR = "block,layer,kv,token,head,dim"

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class KVLayoutMismatchError(KVRelayError):
    """Two workers' caches cannot exchange blocks; the message lists every differing field."""


@dataclass(frozen=True)
class KVLayout:
    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    order: str = BLOCK_MAJOR
    # A digest of the weights (a repository model's files): two versions served under one id must not
    # exchange KV, which would pass every other check and silently give wrong tokens. "": unknown.
    weights: str = ""

    @property
    def block_elems(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        return self.block_elems * _DTYPE_BYTES[self.dtype]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def mismatches(self, other: KVLayout) -> list[str]:
        return [
            f"{name}: {mine!r} != {theirs!r}"
            for name, mine in asdict(self).items()
            if (theirs := getattr(other, name)) != mine
        ]

    def check_compatible(self, other: KVLayout) -> None:
        diff = self.mismatches(other)
        if diff:
            raise KVLayoutMismatchError("KV layouts differ, refusing to exchange blocks: " + "; ".join(diff))
