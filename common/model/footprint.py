"""How much memory a served model takes: what a worker's memory budget counts.

Measured from the loaded modules (packed weights are opaque to torch, so they are counted from
their shape and format), and estimated before a load from the parameter count, so a worker can
evict before it loads rather than after it has run out of memory.
"""

from __future__ import annotations

import torch
from torch import nn

from common.config import EngineConfig
from common.model.quant import PackedLinear
from common.model_source import ModelSource

_BYTES_PER_WEIGHT = {"fp16": 2, "int8": 1}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and packed weight of `model` (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, PackedLinear) and m._packed is not None:
            total += m.in_features * m.out_features * _BYTES_PER_WEIGHT[m.fmt]
    return total


def estimate_weight_bytes(parameter_count: int, quantization: str, dtype: str) -> int:
    """Before loading: bytes the weights will take once served in `quantization` ("none": `dtype`)."""
    if quantization in _BYTES_PER_WEIGHT:
        return parameter_count * _BYTES_PER_WEIGHT[quantization]
    return parameter_count * torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def estimate_bytes(source: ModelSource, config: EngineConfig, quantization: str) -> int:
    """A model's weights as served plus its KV cache, before it is loaded."""
    from common.repository.metadata import inspect_weights  # headers only: no tensor is read

    count = inspect_weights(source).parameter_count
    weights = estimate_weight_bytes(count, quantization, config.resolved_dtype())
    kv = config.kv_cache_mb * 2**20 if config.num_kv_blocks is None else 0  # blocks: known once loaded
    return weights + kv
