"""One place that turns an EngineConfig into a ready engine: model, tokenizer, cache, threads."""

from __future__ import annotations

import torch

from common.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.model.loader import load_model
from common.model_source import resolve_model
from common.tokenizer import Tokenizer


def build_engine(config: EngineConfig, progress: bool = True) -> LLMEngine:
    if config.threads:
        torch.set_num_threads(config.threads)
    source = resolve_model(config.model)
    tokenizer = Tokenizer.from_source(source)
    model = load_model(source, getattr(torch, config.resolved_dtype()), config.device, progress=progress)
    return LLMEngine(model, config, source.model_id, tokenizer)
