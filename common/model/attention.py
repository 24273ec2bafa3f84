"""Paged attention over the KV cache for a mixed batch of prefill chunks and decode tokens.

The batch is a flat list of T new tokens. Decode sequences (one new token each) are attended
together in one padded SDPA call; each prefill chunk gets its own call, so a long prompt and
many decodes share one forward pass without one padding the other. The metadata, masks included,
is built once per step by the model runner and shared by every layer; there is no global context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.kv.cache import KVCache


@dataclass
class PrefillChunk:
    start: int  # first index of this chunk's tokens in the flat batch
    num_new: int  # tokens computed in this step
    context_len: int  # tokens in the sequence after this step (cached + earlier chunks + new)
    block_table: torch.Tensor  # [ceil(context_len / block_size)]
    mask: torch.Tensor | None = None  # [num_new, context_len] additive; None: nothing cached before (causal)


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block id each new token's K/V is written to
    slot_offsets: torch.Tensor  # [T] offset inside that block
    prefills: list[PrefillChunk]
    decode_token_idx: torch.Tensor  # [B] index in the flat batch of each decode token
    decode_block_tables: torch.Tensor  # [B, max_blocks], padded with 0
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] additive (0 or -inf); None: attend to all


def additive_mask(keep: torch.Tensor) -> torch.Tensor:
    """A boolean "may attend" mask as SDPA's additive float mask: built once per step, not per layer."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, float("-inf"))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hk, D] for the new tokens. Returns [T, Hq, D]."""
    cache.write(layer, meta.slot_blocks, meta.slot_offsets, k, v)
    out = torch.empty_like(q) if meta.prefills else q
    for chunk in meta.prefills:
        sl = slice(chunk.start, chunk.start + chunk.num_new)
        if chunk.mask is None:  # nothing cached before this chunk: attend to the fresh K/V, no gather
            ck, cv = k[sl], v[sl]
        else:
            ck, cv = cache.gather(layer, chunk.block_table)
            ck, cv = ck[: chunk.context_len], cv[: chunk.context_len]
        out[sl] = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1),
            ck.transpose(0, 1),
            cv.transpose(0, 1),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
    if meta.decode_token_idx.numel():
        idx = meta.decode_token_idx
        only_decodes = not meta.prefills  # then idx is 0..T-1: skip the gather and scatter
        dk, dv = cache.gather(layer, meta.decode_block_tables)  # [B, L, Hk, D]
        o = F.scaled_dot_product_attention(
            (q if only_decodes else q[idx]).unsqueeze(2),  # [B, Hq, 1, D]
            dk.transpose(1, 2),
            dv.transpose(1, 2),
            attn_mask=meta.decode_mask,
            scale=scale,
            enable_gqa=True,
        ).squeeze(2)
        if only_decodes:
            return o
        out[idx] = o
    return out
