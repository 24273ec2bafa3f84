"""The paged KV cache: one tensor of fixed-size blocks, block-major so a block is contiguous.

Shape [num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]. Keeping a whole
block in one region means a transfer moves one region per block (or per run of adjacent blocks),
and NIXL registers the whole cache once.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import torch

from common.kv.layout import KVLayout


class KVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu") -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (num_blocks, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.tensor = _zeroed(shape, getattr(torch, layout.dtype), torch.device(device))
        # Per-layer views of K and V, [num_blocks, block_size, H, D] each (strided over the other
        # layers): writes and gathers index these directly, which costs a fraction of indexing the
        # whole tensor with a mix of index tensors and integers.
        self._k = [self.tensor[:, layer, 0] for layer in range(layout.num_layers)]
        self._v = [self.tensor[:, layer, 1] for layer in range(layout.num_layers)]

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def write(
        self, layer: int, block_ids: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store k, v ([T, H, D]) of T tokens at (block_ids[t], offsets[t]) of one layer."""
        self._k[layer].index_put_((block_ids, offsets), k)
        self._v[layer].index_put_((block_ids, offsets), v)

    def gather(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the blocks in block_table ([..., n]) as [..., n * block_size, H, D]: one
        index_select of whole blocks each, whose result is contiguous, so the reshape is a view."""
        shape = (*block_table.shape[:-1], block_table.shape[-1] * self.block_size, *self.tensor.shape[-2:])
        flat = block_table.reshape(-1)
        return self._k[layer].index_select(0, flat).view(shape), self._v[layer].index_select(0, flat).view(shape)

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Whole blocks, [n, layers, 2, bs, H, D], for export: a view when the ids are one ascending
        run (the usual case for a fresh allocation), else a gathered copy."""
        ids = list(block_ids)
        if ids and ids == list(range(ids[0], ids[0] + len(ids))):
            return self.tensor[ids[0] : ids[0] + len(ids)]
        return self.tensor[torch.as_tensor(ids, dtype=torch.long)]

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Fill whole blocks from an export of the same layout."""
        expected = (len(block_ids), *self.tensor.shape[1:])
        if tuple(data.shape) != expected:
            raise ValueError(f"block data has shape {tuple(data.shape)}, expected {expected}")
        self.tensor[torch.as_tensor(list(block_ids), dtype=torch.long)] = data.to(self.tensor.dtype)

    def block_view(self, block_id: int) -> torch.Tensor:
        """The live memory of one block (no copy): what a zero-copy transport reads or writes."""
        return self.tensor[block_id]


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros that take memory only as they are written. On CPU an anonymous mapping: the kernel
    gives every page as zeros on first touch, so a worker's resident memory grows with the blocks
    it has used, not with the cache's size (torch.zeros would write, and so commit, all of it).
    Unwritten K/V must read as zeros, never garbage: padded attention rows multiply them by 0."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    mapping = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)
    return torch.frombuffer(mapping, dtype=dtype).view(shape)  # the tensor keeps the mapping alive
