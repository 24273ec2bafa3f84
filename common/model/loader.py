"""Build a LlamaForCausalLM from a GGUF file or a safetensors directory, with a progress bar."""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch
from rich.progress import Progress

from common.errors import ModelLoadError
from common.model.config import ModelConfig
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
_SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")


def load_model(
    source: ModelSource, dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = True
) -> LlamaForCausalLM:
    if source.kind == "gguf":
        cfg, weights, count = _gguf(source)
    else:
        cfg, weights, count = _safetensors(source)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
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


def gguf_model_config(reader) -> ModelConfig:  # noqa: ANN001 - gguf.GGUFReader
    arch = _field(reader, "general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; supported: {_SUPPORTED_ARCHS}")

    def meta(key: str, default: object = None) -> object:
        return _field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = meta("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(meta("attention.key_length", hidden // heads)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(meta("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _field(reader, key: str, default: object = None) -> object:  # noqa: ANN001
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _gguf(source: ModelSource) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]], int]:
    from gguf import dequantize

    reader = open_gguf(source.path)
    cfg = gguf_model_config(reader)
    # llama.cpp's converter interleaves the rotary halves of Q and K for Llama; undo it so one
    # rotate_half RoPE serves GGUF and safetensors alike.
    unpermute = _field(reader, "general.architecture") == "llama"

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            array = dequantize(t.data, t.tensor_type)
            if not array.flags.writeable:  # unquantized tensors are views of the read-only mapping
                array = array.copy()
            tensor = torch.from_numpy(array)
            parts = t.name.split(".")
            if parts[0] == "blk":
                layer, base, kind = parts[1], parts[2], parts[3]
                if unpermute and base in ("attn_q", "attn_k"):
                    heads = cfg.num_heads if base == "attn_q" else cfg.num_kv_heads
                    tensor = _unpermute_rotary(tensor, heads)
                yield f"layers.{layer}.{_GGUF_LAYER_NAMES[base]}.{kind}", tensor
            else:
                yield f"{_GGUF_TOP_NAMES[parts[0]]}.{parts[1]}", tensor

    return cfg, tensors(), len(reader.tensors)


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
