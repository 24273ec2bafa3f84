"""A Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) in plain torch over a paged KV cache.

Projections are fused (q|k|v and gate|up) at load time: fewer, larger matmuls cost less Python
and dispatch overhead per layer, which dominates single-stream decode on a CPU. With
`quantization` "fp16" or "int8", every projection, the embedding and the output head hold packed
weights (common/model/quant.py); norms, RoPE and the KV cache stay in the compute dtype, so the
KV layout, and what moves between workers, does not depend on it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from common.kv.cache import KVCache
from common.model.attention import AttentionMetadata, paged_attention
from common.model.config import ModelConfig
from common.model.quant import CompactEmbedding, PackedLinear, packed_modules
from common.model.rope import RotaryEmbedding, apply_rotary


class Linear(nn.Module):
    """y = x W (+ b) with W stored [in, out]: for the single-row products of decode this layout is
    ~20% faster than nn.Linear's [out, in] on CPU BLAS, and no slower for large batches."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)


def make_linear(in_features: int, out_features: int, bias: bool, quantization: str) -> nn.Module:
    if quantization == "none":
        return Linear(in_features, out_features, bias)
    return PackedLinear(in_features, out_features, bias, quantization)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused call with the weight: a third less time per norm at batch 1
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # lower precision: the statistics in fp32, then back, then the weight (as the reference does)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, quantization: str = "none") -> None:
        super().__init__()
        self.layer = layer
        self.nq, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.nq * self.hd, self.nkv * self.hd
        self.qkv_proj = make_linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, quantization)
        self.o_proj = make_linear(self.q_size, cfg.hidden_size, False, quantization)
        self.scale = self.hd**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k rotated in one call (they share the positions): half the small ops of two calls
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(t, self.nq + self.nkv, self.hd), *rope)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.nkv, self.hd)
        o = paged_attention(qk[:, : self.nq], qk[:, self.nq :], v, self.layer, cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quantization: str = "none") -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, quantization)
        self.down_proj = make_linear(cfg.intermediate_size, cfg.hidden_size, False, quantization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, quantization: str = "none") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, quantization)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, quantization)

    def forward(self, x, rope, cache, meta):  # noqa: ANN001 - hot path, types as in Attention
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


# HF parameter name suffix -> (fused parameter suffix, shard index); shards are concatenated in order.
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_PARTS = {"qkv_proj": 3, "gate_up_proj": 2}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, quantization: str = "none") -> None:
        super().__init__()
        self.config = cfg
        self.quantization = quantization
        packed = quantization != "none"
        h, vocab = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = CompactEmbedding(vocab, h, quantization) if packed else nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, quantization) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg)
        if packed:  # tied or not, the head is a packed linear (over the embedding's values when tied)
            self.lm_head: nn.Module | None = PackedLinear(h, vocab, False, quantization)
        else:
            self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(h, vocab, bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the T new tokens; K/V are written into `cache`."""
        x = self.embed_tokens(input_ids)
        rope = self.rope.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, cache, meta)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if isinstance(self.lm_head, PackedLinear):
            return self.lm_head(hidden.float())
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up as soon as a layer's parts are all in
        (so no more than one layer's shards are held at once). Raises on missing or unknown names."""
        params = dict(self.named_parameters())
        quantized = {f"{n}.weight": m for n, m in packed_modules(self).items()}
        tied_head = self.config.tie_word_embeddings and isinstance(self.lm_head, PackedLinear)
        if tied_head:
            del quantized["lm_head.weight"]  # filled from the embedding
        expected = set(params) | set(quantized)
        shards: dict[str, dict[int, torch.Tensor]] = {}
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding serves as the output projection
            if "rotary_emb" in name:
                continue
            *prefix, proj, kind = name.split(".")
            if proj in _FUSED:
                fused, idx = _FUSED[proj]
                target = ".".join([*prefix, fused, kind])
                parts = shards.setdefault(target, {})
                parts[idx] = tensor
                if len(parts) < _PARTS[fused]:
                    continue
                name, tensor = target, torch.cat([parts[i] for i in sorted(parts)], dim=0)
                del shards[target]
            self._copy(params, quantized, name, tensor)
            loaded.add(name)
            if tied_head and name == "embed_tokens.weight":
                self.lm_head.set_weight(tensor)
        if shards:
            raise ValueError(f"weights are missing parts of {sorted(shards)[:3]}")
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"weights are missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _copy(self, params: dict[str, nn.Parameter], quantized: dict, name: str, t: torch.Tensor) -> None:
        if name in quantized:
            quantized[name].set_weight(t)  # type: ignore[operator]
            return
        if name not in params:
            raise ValueError(f"unexpected weight {name!r} for a Llama-family model")
        p = params[name]
        owner = self.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, Linear) and name.endswith(".weight"):
            t = t.t()  # checkpoints store [out, in]
        if tuple(p.shape) != tuple(t.shape):
            raise ValueError(f"weight {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        p.copy_(t.to(p.dtype))
