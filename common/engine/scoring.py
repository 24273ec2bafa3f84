"""Logits at every position of a token sequence, from one paged prefill of the model: what quality
checks compare against a reference (another weight format, or transformers)."""

from __future__ import annotations

import torch

from common.engine.model_runner import ModelRunner
from common.engine.sampling import SamplingParams
from common.engine.sequence import Sequence
from common.kv.block_manager import BlockManager
from common.kv.cache import KVCache
from common.kv.layout import KVLayout
from common.model.llama import LlamaForCausalLM


def prompt_logits(model: LlamaForCausalLM, tokens: list[int], block_size: int = 16) -> torch.Tensor:
    """[len(tokens), vocab] fp32 logits; the KV cache used is sized for the sequence and freed."""
    cfg = model.config
    blocks = -(-len(tokens) // block_size) + 1
    layout = KVLayout("scoring", "float32", block_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(layout, blocks)
    manager = BlockManager(blocks, block_size)
    seq = Sequence("scoring", tokens, SamplingParams())
    manager.allocate(seq)
    try:
        ids, pos, meta, _, _ = ModelRunner(model, cache).prepare_inputs([(seq, len(tokens))])
        with torch.inference_mode():
            return model.logits(model(ids, pos, cache, meta))
    finally:
        manager.free(seq)
