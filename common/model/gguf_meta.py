"""Model facts read from GGUF metadata or config.json, without torch (the gateway needs them)."""

from __future__ import annotations

import json

from common.errors import ModelLoadError
from common.model.config import ModelConfig
from common.model_source import ModelSource, open_gguf

_SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")


def context_length(source: ModelSource) -> int:
    if source.kind == "gguf":
        return gguf_model_config(open_gguf(source.path)).max_position
    return ModelConfig.from_hf_config(json.loads((source.path / "config.json").read_text())).max_position


def gguf_model_config(reader) -> ModelConfig:  # noqa: ANN001 - gguf.GGUFReader
    arch = gguf_field(reader, "general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; supported: {_SUPPORTED_ARCHS}")

    def meta(key: str, default: object = None) -> object:
        return gguf_field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = meta("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
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
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def gguf_field(reader, key: str, default: object = None) -> object:  # noqa: ANN001
    f = reader.fields.get(key)
    return default if f is None else f.contents()
