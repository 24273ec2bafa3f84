"""One place that turns an EngineConfig into a ready engine: model, tokenizer, cache, threads."""

from __future__ import annotations

import torch

from common.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.kv.events import KVEventLog
from common.memory import release_freed_memory
from common.model.loader import gguf_is_quantized, load_model
from common.model_source import ModelSource, open_gguf, resolve_model
from common.tokenizer import Tokenizer


def build_engine(
    config: EngineConfig, progress: bool = True, events: KVEventLog | None = None, model_id: str | None = None
) -> LLMEngine:
    """`model_id`: what to serve it as (default: the model source's id), for a pool that pinned a
    repository model to its version."""
    if config.threads:
        torch.set_num_threads(config.threads)
    source = resolve_model(config.model, verify=True)  # a repository model's digests, before serving it
    tokenizer = Tokenizer.from_source(source)
    quantization = resolve_quantization(config, source)
    model = load_model(source, getattr(torch, config.resolved_dtype()), config.device, progress, quantization)
    _release_load_memory()
    return LLMEngine(model, config, model_id or source.model_id, tokenizer, events, source.weights_digest)


def resolve_quantization(config: EngineConfig, source: ModelSource) -> str:
    """`auto`: what the model's repository entry says, if it says; else fp16 on CPU (float32
    compute) for a GGUF file whose weights are stored quantized (they carry no more precision than
    fp16 keeps); none for safetensors and on CUDA (bf16 is fast there). int8 only when asked for:
    it is faster but changes a small model's answers (common/model/quant.py)."""
    if config.quantization != "auto":
        return config.quantization
    on_cpu_fp32 = config.device == "cpu" and config.resolved_dtype() == "float32"
    if source.serve_quantization is not None:  # the repository entry says how to serve it
        return source.serve_quantization if on_cpu_fp32 else "none"
    return "fp16" if on_cpu_fp32 and source.kind == "gguf" and gguf_is_quantized(source) else "none"


def _release_load_memory() -> None:
    """Drop the parsed GGUF (its 49k-entry vocabulary costs ~200 MB of small objects) and hand the
    heap freed by dequantization back to the OS, so the KV cache is not stacked on top of it."""
    open_gguf.cache_clear()
    release_freed_memory()
