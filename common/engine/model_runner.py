"""Turns a scheduled batch into one forward pass: flat inputs, attention metadata, logits, samples."""

from __future__ import annotations

import torch

from common.engine.sampler import Sampler
from common.engine.sequence import Sequence
from common.kv.cache import KVCache
from common.model.attention import AttentionMetadata, PrefillChunk
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
        bs = self.cache.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_idx: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        last_idx: list[int] = []
        finishing: list[Sequence] = []
        dev = self.device
        for seq, n in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            flat_start = len(ids)
            tokens = seq.token_ids
            ids.extend(tokens[start:end])
            pos.extend(range(start, end))
            for p in range(start, end):
                slot_blocks.append(seq.block_table[p // bs])
                slot_offsets.append(p % bs)
            table = seq.block_table[: -(-end // bs)]
            if n == 1 and start > 0:
                decode_idx.append(flat_start)
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(flat_start, n, end, torch.tensor(table, dtype=torch.long, device=dev)))
            if end == len(seq):
                last_idx.append(flat_start + n - 1)
                finishing.append(seq)
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=dev),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=dev),
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
            lens = torch.tensor(decode_lens, device=dev)
            meta.decode_mask = (torch.arange(width * bs, device=dev).unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            meta,
            last_idx,
            finishing,
        )
