"""Weights served in fewer bytes on CPU: a decode step reads every weight once, so it is bound by
memory bandwidth, and smaller weights move fewer bytes.

Both formats use fbgemm kernels that torch ships, no kernel of our own:
- `fp16`: weights stored as float16 and packed (`quantized::linear_prepack_fp16`), activations and
  accumulation in fp32. Half the bytes of fp32, and on SmolLM2 the same answers (top-1 agreement
  with fp32 above 99.7%, KL ~1e-5 over 1,000 positions of real text).
- `int8`: weights int8 per output channel, activations quantized to 8 bits per token at each call
  (`quantized::linear_dynamic`, rows pre-scaled: see `PackedLinear.forward`). A quarter of the
  bytes and the fastest at large batches, but 8-bit activations cannot follow the outlier channels
  of a small LLM's activations, and per-channel int8 weights lose some of a 4-bit file's per-block
  precision: on SmolLM2 top-1 agreement with fp32 is ~0.90 (per-tensor scales gave ~0.5; int8
  weights alone, activations in fp32, ~0.97). Offered for models that tolerate it; measure first
  (`kvrelay bench engine` reports agreement and KL per mode). fbgemm sums pairs of u8*s8 products
  in 16 bits on AVX2, which can saturate for two adjacent extreme values; the measured agreement
  includes that.
The embedding is kept in the same format (int8 rows with a scale each, or float16 rows): a lookup
converts only the rows it reads. The output head is a packed linear over the same values.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZATIONS = ("none", "fp16", "int8")


def int8_per_channel(weight: torch.Tensor, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a [rows, cols] tensor: (int8 values, fp32 scale per row). In
    chunks of rows, so that quantizing a large matrix (an embedding) adds little to peak memory."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0])
    for i in range(0, weight.shape[0], rows_per_chunk):
        w = weight[i : i + rows_per_chunk].float()
        s = scale[i : i + rows_per_chunk]
        torch.div(w.abs().amax(dim=1), 127.0, out=s).clamp_min_(1e-12)
        q[i : i + rows_per_chunk] = (w / s[:, None]).round_().clamp_(-127, 127)  # never in place: w may be the caller's
    return q, scale


class PackedLinear(nn.Module):
    """y = x Wᵀ (+ b) with W packed for fbgemm as `fp16` or `int8`; filled by `set_weight` at load."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, fmt: str = "fp16") -> None:
        super().__init__()
        if fmt not in ("fp16", "int8"):
            raise ValueError(f"unknown weight format {fmt!r}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._packed: torch.ScriptObject | None = None

    def set_weight(self, weight: torch.Tensor) -> None:
        """`weight` as checkpoints store it, [out, in]; any float dtype."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        if self.fmt == "fp16":
            self._packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), None)
            return
        q, scale = int8_per_channel(weight)
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # fbgemm takes its int8 weights as a quantized tensor, which torch flags
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "fp16":
            y = torch.ops.quantized.linear_dynamic_fp16(x, self._packed)
        else:
            # Per-token activation scales from a per-tensor kernel: each row is brought to absmax 1
            # before fbgemm quantizes the whole input with one scale, and its output scaled back (a
            # linear map commutes with a row's scale). One outlier token then no longer coarsens
            # every other row of the batch, or of a prompt.
            # One row (a decode step of one sequence) needs none of this: its tensor scale is its own.
            if x.shape[0] == 1:
                y = torch.ops.quantized.linear_dynamic(x, self._packed, False)
            else:
                r = x.abs().amax(-1, keepdim=True).clamp_min_(1e-12)  # (vector_norm(inf) is 10x slower)
                y = torch.ops.quantized.linear_dynamic(x / r, self._packed, False).mul_(r)
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        """The [out, in] fp32 weight this layer computes with (the tests' reference)."""
        if self.fmt == "fp16":
            return torch.ops.quantized.linear_unpack_fp16(self._packed)[0].float()
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize()

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}, bias={self.bias is not None}"


class CompactEmbedding(nn.Module):
    """Token embeddings as float16 rows, or int8 rows with a scale each; a lookup converts only its rows."""

    def __init__(self, num_embeddings: int, dim: int, fmt: str = "fp16") -> None:
        super().__init__()
        self.num_embeddings, self.dim, self.fmt = num_embeddings, dim, fmt
        self.register_buffer("table", torch.empty(0, dtype=torch.int8 if fmt == "int8" else torch.float16), False)
        self.register_buffer("scale", torch.empty(0), persistent=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.num_embeddings, self.dim):
            raise ValueError(f"embedding of shape {tuple(weight.shape)}, expected {(self.num_embeddings, self.dim)}")
        if self.fmt == "int8":
            self.table, self.scale = int8_per_channel(weight)
        else:
            self.table = weight.to(torch.float16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table[ids].float()
        return rows * self.scale[ids].unsqueeze(-1) if self.fmt == "int8" else rows

    def dequantized_weight(self) -> torch.Tensor:
        return self.table.float() * self.scale[:, None] if self.fmt == "int8" else self.table.float()


def packed_modules(model: nn.Module) -> dict[str, PackedLinear | CompactEmbedding]:
    """Name -> module of every layer whose weight is packed (what `load_weights` fills)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear | CompactEmbedding)}
