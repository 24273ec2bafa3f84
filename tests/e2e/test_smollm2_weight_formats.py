"""The real SmolLM2 served with packed weights: `auto` picks fp16 for its quantized GGUF on CPU,
and fp16 keeps the model's predictions (top-1 agreement and KL against fp32 weights over 2,048
positions of real text) and its answers."""

import pytest

from bench.quality import compare, real_text, windows
from common.config import EngineConfig
from common.engine.factory import build_engine, resolve_quantization
from common.engine.sampling import SamplingParams
from common.engine.scoring import prompt_logits
from common.model_source import resolve_model
from tests.helpers import assert_no_leaks, run_to_completion, tokens_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp16():
    eng = build_engine(EngineConfig(threads=2), progress=False)  # auto
    yield eng
    assert_no_leaks(eng)


def test_auto_serves_fp16_on_cpu_for_a_quantized_gguf():
    source = resolve_model(None)
    assert resolve_quantization(EngineConfig(), source) == "fp16"
    assert resolve_quantization(EngineConfig(device="cuda"), source) == "none"


def test_fp16_weights_keep_the_predictions(fp16):
    reference = build_engine(EngineConfig(threads=2, quantization="none"), progress=False).runner.model
    assert fp16.runner.model.quantization == "fp16"
    n = agree = kl = 0.0
    for window in windows(fp16.tokenizer.encode(real_text()), 2048):
        d_n, d_agree, d_kl = compare(prompt_logits(fp16.runner.model, window), prompt_logits(reference, window))
        n, agree, kl = n + d_n, agree + d_agree, kl + d_kl
    assert n >= 2048
    assert agree / n >= 0.99, f"top-1 agreement {agree / n:.4f}"
    assert kl / n < 1e-3, f"mean KL {kl / n:.2e}"


def test_fp16_answers_paris(fp16):
    ids = fp16.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    fp16.add_request("paris", ids, SamplingParams.create(max_tokens=20))
    out = run_to_completion(fp16)["paris"]
    assert "Paris" in fp16.tokenizer.decode(tokens_of(out))


def test_int8_agreement_stays_per_token():
    """int8 is offered, not chosen by auto: on SmolLM2 it agrees with fp32 on ~90% of next tokens
    (per-tensor activation scales gave ~50%), and it answers the Paris prompt wrongly, which is why
    auto serves fp16. This holds the measured agreement so that it cannot silently fall back."""
    int8 = build_engine(EngineConfig(threads=2, quantization="int8"), progress=False)
    reference = build_engine(EngineConfig(threads=2, quantization="none"), progress=False).runner.model
    n = agree = 0.0
    for window in windows(int8.tokenizer.encode(real_text()), 1024):
        d_n, d_agree, _ = compare(prompt_logits(int8.runner.model, window), prompt_logits(reference, window))
        n, agree = n + d_n, agree + d_agree
    assert agree / n >= 0.85, f"top-1 agreement {agree / n:.4f}"
    assert_no_leaks(int8)
