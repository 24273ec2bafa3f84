"""Rotary position embedding in the half-split ("rotate_half") convention of HF Llama checkpoints."""

from __future__ import annotations

import math

import torch

from common.model.config import ModelConfig


def _inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1 frequency-dependent scaling: long wavelengths are stretched, short ones kept.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        t = torch.arange(cfg.max_position, dtype=torch.float64)
        freqs = torch.outer(t, _inv_freq(cfg))
        # [max_position, 2, D/2] each, in the form apply_rotary takes: cos for both halves, and sin
        # signed for rotate_half (-sin for the first half, +sin for the second)
        cos, sin = freqs.cos().float(), freqs.sin().float()
        self.register_buffer("cos", torch.stack((cos, cos), 1), persistent=False)
        self.register_buffer("sin", torch.stack((-sin, sin), 1), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tables [T, 1, 2, D/2], looked up once per forward and shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, 2, D/2] from `cos_sin`. x * cos + rotate_half(x) * sin, where
    rotate_half's swap of the halves is a flip of the size-2 axis: three ops, no split or concat."""
    halves = x.view(*x.shape[:-1], 2, x.shape[-1] // 2)
    return torch.addcmul(halves * cos, halves.flip(-2), sin).view(x.shape)
