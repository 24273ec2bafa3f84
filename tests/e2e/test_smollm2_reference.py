"""The real SmolLM2-135M-Instruct: our tokenizer, logits and greedy tokens against Hugging Face
transformers loading the very same GGUF file."""

import pytest
import torch

from common.config import EngineConfig
from common.engine.factory import build_engine
from common.engine.sampling import SamplingParams
from tests.helpers import assert_no_leaks, run_to_completion, tokens_of

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

STORY = (
    "The lighthouse keeper counted the ships every evening, writing their names in a leather book. "
    "Some nights the fog rolled in so thick that he could only listen for horns. "
)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 100 and say why they are prime: 101, 103, 107.",
    "Summarize this story:\n" + STORY * 10,
]


@pytest.fixture(scope="module")
def engine():
    eng = build_engine(EngineConfig(threads=2, quantization="none"), progress=False)
    yield eng
    assert_no_leaks(eng)


@pytest.fixture(scope="module")
def hf(engine):
    from common.model_source import resolve_model

    path = resolve_model(None).path
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return tok, model


def chat_ids(engine, text: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_prompt_lengths_cover_20_to_400_tokens(engine):
    lengths = sorted(len(chat_ids(engine, q)) for q in QUESTIONS)
    assert lengths[0] >= 20 and 300 <= lengths[-1] <= 400, lengths


def test_tokenizer_matches_transformers(engine, hf):
    tok, _ = hf
    texts = [
        *QUESTIONS,
        "  leading spaces",
        "numbers 1234567 and 3.14159",
        "émigré naïve café 東京 🙂",
        "<|im_start|>user\nhi<|im_end|>",
        "tabs\tand\nnewlines\n\n",
        "don't won't it's",
    ]
    for t in texts:
        assert engine.tokenizer.encode(t) == tok.encode(t, add_special_tokens=False), t
        ids = engine.tokenizer.encode(t)
        assert engine.tokenizer.decode(ids, skip_special_tokens=False) == tok.decode(ids), t
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    assert engine.tokenizer.encode_chat(msgs) == list(
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


def test_logits_match_transformers(engine, hf):
    """Both sides dequantize the same Q4_1 blocks to fp32 with the same gguf code, so the weights are
    bit-identical; what differs is only the order of fp32 operations (fused q|k|v, SDPA kernels),
    which perturbs logits by ~1e-5 relative over 30 layers. 2e-3 absolute on logits of magnitude
    ~20 is far below any real defect (a wrong RoPE or norm moves them by whole units)."""
    from tests.unit.test_model_reference import all_logits

    _, model = hf
    ids = chat_ids(engine, QUESTIONS[2])
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].float()
    got = all_logits(engine.runner.model, ids)
    assert ref.abs().max() > 5
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_greedy_tokens_match_transformers_generate(engine, hf):
    _, model = hf
    new = 24
    params = SamplingParams.create(max_tokens=new)  # both sides stop at <|im_end|>
    prompts = [chat_ids(engine, q) for q in QUESTIONS]
    for i, ids in enumerate(prompts):
        engine.add_request(f"q{i}", ids, params)
    outs = run_to_completion(engine)
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)
        assert tokens_of(outs[f"q{i}"]) == ref[0, len(ids) :].tolist(), QUESTIONS[i][:40]
    assert_no_leaks(engine)


def test_answers_paris(engine):
    engine.add_request("paris", chat_ids(engine, QUESTIONS[0]), SamplingParams.create(max_tokens=20))
    out = run_to_completion(engine)["paris"]
    assert "Paris" in engine.tokenizer.decode(tokens_of(out))
    assert out[-1].finish_reason == "stop"


def test_stop_string_cuts_text(engine):
    params = SamplingParams.create(max_tokens=30, stop=["France"])
    engine.add_request("stop", chat_ids(engine, QUESTIONS[0]), params)
    out = run_to_completion(engine)["stop"]
    assert out[-1].finish_reason == "stop"
    assert out[-1].text == "The capital of "
