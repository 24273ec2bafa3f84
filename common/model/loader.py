"""Build a LlamaForCausalLM from a GGUF file or a safetensors directory, with a progress bar."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import torch
from rich.progress import Progress

from common.errors import ModelLoadError
from common.memory import release_freed_memory
from common.model.config import ModelConfig
from common.model.gguf_meta import gguf_field, gguf_model_config
from common.model.llama import LlamaForCausalLM
from common.model.rope import RotaryEmbedding
from common.model_source import ModelSource, open_gguf

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def load_model(
    source: ModelSource,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress: bool = True,
    quantization: str = "none",
) -> LlamaForCausalLM:
    """Tensor by tensor: each is dequantized (GGUF) or read (safetensors), copied in (or quantized)
    and dropped, so the full-precision model never exists in memory when serving int8."""
    if quantization != "none" and (device != "cpu" or dtype != torch.float32):
        raise ModelLoadError(f"{quantization} weights are served on CPU with float32 compute only")
    if source.kind == "gguf":
        cfg, weights, count = _gguf(source)
    else:
        cfg, weights, count = _safetensors(source)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, quantization)
    model = model.to_empty(device=device).to(dtype)
    model.rope = RotaryEmbedding(cfg).to(device)  # computed buffers: build them for real, off meta
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"loading {source.model_id}", total=count)

        def ticking() -> Iterator[tuple[str, torch.Tensor]]:
            for item in weights:
                yield item
                bar.advance(task)

        model.load_weights(ticking())
    return model.eval()


def gguf_is_quantized(source: ModelSource) -> bool:
    """Whether the file's matrices are stored below 16 bits (then serving int8 loses little more)."""
    from gguf import GGMLQuantizationType

    full = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    return any(t.tensor_type not in full for t in open_gguf(source.path).tensors if len(t.shape) == 2)


def _gguf(source: ModelSource) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]], int]:
    reader = open_gguf(source.path)
    cfg = gguf_model_config(reader)
    # llama.cpp's converter interleaves the rotary halves of Q and K for Llama; undo it so one
    # rotate_half RoPE serves GGUF and safetensors alike.
    unpermute = gguf_field(reader, "general.architecture") == "llama"

    table = list(reader.tensors)  # views of the file's mapping; all the weights need
    # The parsed metadata (the 49k-entry vocabulary is ~200 MB of small objects) goes before the
    # weights arrive, so the two never add up in the peak; the tokenizer is built by now.
    del reader
    open_gguf.cache_clear()
    release_freed_memory()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in table:
            tensor = dequantize_tensor(t.data, t.tensor_type)
            parts = t.name.split(".")
            if parts[0] == "blk":
                layer, base, kind = parts[1], parts[2], parts[3]
                if unpermute and base in ("attn_q", "attn_k"):
                    heads = cfg.num_heads if base == "attn_q" else cfg.num_kv_heads
                    tensor = _unpermute_rotary(tensor, heads)
                yield f"layers.{layer}.{_GGUF_LAYER_NAMES[base]}.{kind}", tensor
            else:
                yield f"{_GGUF_TOP_NAMES[parts[0]]}.{parts[1]}", tensor

    return cfg, tensors(), len(table)


def dequantize_tensor(data, kind, rows_per_chunk: int = 4096) -> torch.Tensor:  # noqa: ANN001 - gguf types
    """One GGUF tensor's values, a chunk of rows at a time: dequantizing a large matrix whole (the
    embedding) makes intermediates larger than its result, which would set the load's peak."""
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] <= rows_per_chunk:
        array = dequantize(data, kind)
        # unquantized tensors are views of the read-only mapping
        return torch.from_numpy(array if array.flags.writeable else array.copy())
    first = dequantize(data[:rows_per_chunk], kind)
    rows = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    rows[:rows_per_chunk] = first
    for i in range(rows_per_chunk, data.shape[0], rows_per_chunk):
        rows[i : i + rows_per_chunk] = dequantize(data[i : i + rows_per_chunk], kind)
    return torch.from_numpy(rows)


def _unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _safetensors(source: ModelSource) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]], int]:
    from safetensors import safe_open

    try:
        cfg = ModelConfig.from_hf_config(json.loads((source.path / "config.json").read_text()))
    except (KeyError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{source.path / 'config.json'} is not a usable Llama-family config: {e}") from e
    files = sorted(source.path.glob("*.safetensors"))
    count = 0
    for f in files:
        with safe_open(f, "pt") as h:
            count += len(h.keys())

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            with safe_open(f, "pt") as h:
                for name in h.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, h.get_tensor(name)

    return cfg, tensors(), count
