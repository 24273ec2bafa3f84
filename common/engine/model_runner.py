"""Turns a scheduled batch into one forward pass: flat inputs, attention metadata, logits, samples."""

from __future__ import annotations

import torch

from common.engine.sampler import Sampler
from common.engine.sequence import Sequence
from common.kv.cache import KVCache
from common.model.attention import AttentionMetadata, PrefillChunk, additive_mask
from common.model.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: KVCache, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.sampler = Sampler()

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> dict[str, int]:
        """Compute `n` new tokens of each (seq, n); sample for every seq whose tokens are now all
        computed. Returns request id -> sampled token id."""
        input_ids, positions, meta, last_idx, finishing = self.prepare_inputs(batch)
        hidden = self.model(input_ids, positions, self.cache, meta)
        if not finishing:
            return {}
        logits = self.model.logits(hidden[torch.tensor(last_idx, device=self.device)])
        tokens = self.sampler.sample(logits, finishing)
        return {s.request_id: t for s, t in zip(finishing, tokens, strict=True)}

    def prepare_inputs(self, batch: list[tuple[Sequence, int]]):  # noqa: ANN202 - internal tuple
        """Flat token ids and positions, the slot each new token's K/V goes to, and the attention
        metadata. Work per sequence, not per token: a prefill chunk's slots are computed in torch."""
        bs = self.cache.block_size
        dev = self.device
        ids: list[int] = []
        pos: list[int] = []
        # slots in batch order: runs of decode tokens as Python ints, prefill chunks as tensors
        slot_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        run_blocks: list[int] = []
        run_offsets: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_idx: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        last_idx: list[int] = []
        finishing: list[Sequence] = []
        for seq, n in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            flat_start = len(ids)
            ids.extend(seq.token_ids[start:end])
            pos.extend(range(start, end))
            table = seq.block_table[: -(-end // bs)]
            if n == 1 and start > 0:
                run_blocks.append(table[start // bs])
                run_offsets.append(start % bs)
                decode_idx.append(flat_start)
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                if run_blocks:
                    slot_parts.append(_as_tensors(run_blocks, run_offsets, dev))
                    run_blocks, run_offsets = [], []
                table_t = torch.tensor(table, dtype=torch.long, device=dev)
                chunk_pos = torch.arange(start, end, device=dev)
                slot_parts.append((table_t[chunk_pos // bs], chunk_pos % bs))
                mask = None
                if start > 0:  # attends to cached tokens too: token i sees positions <= start + i
                    mask = additive_mask(torch.arange(end, device=dev).unsqueeze(0) <= chunk_pos.unsqueeze(1))
                prefills.append(PrefillChunk(flat_start, n, end, table_t, mask))
            if end == len(seq):
                last_idx.append(flat_start + n - 1)
                finishing.append(seq)
        if run_blocks or not slot_parts:
            slot_parts.append(_as_tensors(run_blocks, run_offsets, dev))
        blocks, offsets = slot_parts[0] if len(slot_parts) == 1 else map(torch.cat, zip(*slot_parts, strict=True))
        meta = AttentionMetadata(
            slot_blocks=blocks,
            slot_offsets=offsets,
            prefills=prefills,
            decode_token_idx=torch.tensor(decode_idx, dtype=torch.long, device=dev),
            decode_block_tables=torch.zeros(0, 0, dtype=torch.long, device=dev),
            decode_mask=None,
        )
        if decode_idx:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = torch.tensor(
                [t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=dev
            )
            if min(decode_lens) < width * bs:  # some rows end inside their last block, or are padded
                lens = torch.tensor(decode_lens, device=dev)
                keep = torch.arange(width * bs, device=dev).unsqueeze(0) < lens.unsqueeze(1)
                meta.decode_mask = additive_mask(keep)[:, None, None, :]
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            meta,
            last_idx,
            finishing,
        )


def _as_tensors(blocks: list[int], offsets: list[int], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(blocks, dtype=torch.long, device=dev), torch.tensor(offsets, dtype=torch.long, device=dev)
