"""One place that turns an EngineConfig into a ready engine: model, tokenizer, cache, threads."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys

import torch

from common.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.model.loader import load_model
from common.model_source import open_gguf, resolve_model
from common.tokenizer import Tokenizer


def build_engine(config: EngineConfig, progress: bool = True) -> LLMEngine:
    if config.threads:
        torch.set_num_threads(config.threads)
    source = resolve_model(config.model)
    tokenizer = Tokenizer.from_source(source)
    model = load_model(source, getattr(torch, config.resolved_dtype()), config.device, progress=progress)
    _release_load_memory()
    return LLMEngine(model, config, source.model_id, tokenizer)


def _release_load_memory() -> None:
    """Drop the parsed GGUF (its 49k-entry vocabulary costs ~200 MB of small objects) and hand the
    heap freed by dequantization back to the OS, so the KV cache is not stacked on top of it."""
    open_gguf.cache_clear()
    gc.collect()
    if sys.platform == "linux":
        with contextlib.suppress(OSError):  # not glibc (e.g. musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
