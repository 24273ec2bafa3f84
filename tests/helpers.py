"""Shared test helpers: a tiny random Llama and an engine around it, and the KV leak check."""

from __future__ import annotations

import torch

from common.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.engine.outputs import RequestOutput
from common.engine.sampling import SamplingParams
from common.model.config import ModelConfig
from common.model.llama import LlamaForCausalLM

TINY = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position=512,
    tie_word_embeddings=True,
    eos_token_ids=(255,),
)


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> LlamaForCausalLM:
    """Random weights scaled up so logits are peaked: greedy ties (which would make
    'same tokens' comparisons flaky for reasons unrelated to the code) practically never occur."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.normal_(0.0, 0.3 if "embed" in name else 0.12)
    return model.eval()


def tiny_engine(model: LlamaForCausalLM | None = None, **overrides: object) -> LLMEngine:
    cfg = EngineConfig(**{"block_size": 4, "num_kv_blocks": 128, "max_num_batched_tokens": 64, **overrides})
    return LLMEngine(model or tiny_model(), cfg, "tiny-llama")


def greedy(max_tokens: int = 12, **kw: object) -> SamplingParams:
    return SamplingParams.create(max_tokens=max_tokens, ignore_eos=True, **kw)


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError(f"engine did not finish in {max_steps} steps")


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def generate_alone(model: LlamaForCausalLM, prompt: list[int], params: SamplingParams, **cfg: object) -> list[int]:
    engine = tiny_engine(model, **cfg)
    engine.add_request("solo", prompt, params)
    out = tokens_of(run_to_completion(engine)["solo"])
    assert_no_leaks(engine)
    return out


def assert_no_leaks(engine: LLMEngine) -> None:
    """No request holds blocks; cached blocks are all evictable; the block books balance."""
    engine.blocks.check_consistency()
    leaked = engine.blocks.leaks()
    assert not leaked, f"KV blocks still referenced: {leaked}"
    assert not engine.seqs, f"requests still held: {list(engine.seqs)}"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
