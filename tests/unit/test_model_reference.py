"""Our Llama against Hugging Face transformers on the same random weights, loaded through our
safetensors loader (which also exercises the q/k/v and gate/up fusing)."""

import json

import pytest
import torch

from common.engine.scoring import prompt_logits
from common.model.loader import load_model
from common.model_source import resolve_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=request.param == "llama",
    )
    if request.param == "llama":
        cfg = transformers.LlamaConfig(**common)
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        hf = transformers.Qwen2ForCausalLM(cfg)
    hf.eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    assert json.loads((path / "config.json").read_text())["architectures"]
    ours = load_model(resolve_model(path), progress=False)
    return hf, ours


def all_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits at every position from one paged prefill (block size 4: several blocks per prompt)."""
    return prompt_logits(model, tokens, block_size=4)


def test_logits_match_transformers(pair):
    hf, ours = pair
    tokens = torch.randint(0, 300, (57,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    got = all_logits(ours, tokens)
    # fp32 on both sides; only the order of floating-point operations differs
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
