"""Packed weights (fp16, int8) on the tiny model: each layer computes with exactly the weights it
reports (its dequantized values), the loader fills every packed layer from an ordinary checkpoint,
and a packed model agrees with an fp32 model holding those same dequantized weights."""

from __future__ import annotations

import pytest
import torch

from common.engine.scoring import prompt_logits
from common.errors import ModelLoadError
from common.model.llama import Linear
from common.model.loader import load_model
from common.model.quant import CompactEmbedding, PackedLinear, int8_per_channel
from common.model_source import resolve_model
from tests.helpers import assert_no_leaks, greedy, run_to_completion, tiny_engine, tokens_of
from tests.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return resolve_model(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def test_int8_per_channel_round_trips_within_half_a_step():
    w = torch.randn(32, 48) * torch.linspace(0.1, 3.0, 32)[:, None]  # rows of very different ranges
    q, scale = int8_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("fmt, tol", [("fp16", 1e-4), ("int8", 0.03)])
def test_packed_linear_computes_with_its_dequantized_weight(fmt, tol):
    torch.manual_seed(0)
    layer = PackedLinear(64, 96, bias=True, fmt=fmt)
    w = torch.randn(96, 64)
    layer.set_weight(w)
    layer.bias.data.normal_()
    x = torch.randn(7, 64)
    ref = x @ layer.dequantized_weight().t() + layer.bias
    # fp16: only the weights are rounded; int8: activations are quantized per token too (8 bits)
    assert (layer(x) - ref).abs().max() <= tol * ref.abs().max()
    assert (layer.dequantized_weight() - w).abs().max() <= (1e-3 if fmt == "fp16" else w.abs().max() / 127)
    with pytest.raises(ValueError, match="expected"):
        layer.set_weight(torch.randn(64, 96))


def test_int8_activation_scales_are_per_token():
    """A token with outlier activations (1000x the others) in the same call must not coarsen the
    other rows: each row is quantized with its own scale, so its error stays relative to itself."""
    torch.manual_seed(0)
    layer = PackedLinear(64, 96, fmt="int8")
    layer.set_weight(torch.randn(96, 64))
    x = torch.randn(6, 64)
    x[0] *= 1000.0
    ref = x @ layer.dequantized_weight().t()
    err = (layer(x) - ref).abs().amax(-1) / ref.abs().amax(-1)
    assert (err <= 0.03).all(), err
    alone = layer(x[3:4])  # a single row (the decode step of one sequence) takes the direct path
    assert ((alone - ref[3:4]).abs().max() / ref[3].abs().max()) <= 0.03


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_compact_embedding_looks_up_dequantized_rows(fmt):
    emb = CompactEmbedding(50, 16, fmt)
    w = torch.randn(50, 16)
    emb.set_weight(w)
    ids = torch.tensor([3, 0, 49, 3])
    torch.testing.assert_close(emb(ids), emb.dequantized_weight()[ids])
    assert (emb.dequantized_weight() - w).abs().max() < (1e-2 if fmt == "fp16" else w.abs().max() / 127)


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_packed_model_matches_fp32_with_the_same_weights(checkpoint, fmt):
    packed = load_model(checkpoint, progress=False, quantization=fmt)
    reference = load_model(checkpoint, progress=False)
    # The reference computes in fp32 with exactly the packed model's (dequantized) weights.
    with torch.no_grad():
        for name, module in packed.named_modules():
            if isinstance(module, PackedLinear) and name != "lm_head":
                target = reference.get_submodule(name)
                assert isinstance(target, Linear)
                target.weight.copy_(module.dequantized_weight().t())
        reference.embed_tokens.weight.copy_(packed.embed_tokens.dequantized_weight())
    tokens = list(range(3, 40))
    got, ref = prompt_logits(packed, tokens), prompt_logits(reference, tokens)
    if fmt == "fp16":  # the tied head: the embedding's fp16 values, as the reference holds them
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    else:  # activations quantized at every layer: close, not equal
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
        assert cos.min() > 0.98, cos.min()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_packed_model_serves_without_leaks(checkpoint, fmt):
    engine = tiny_engine(load_model(checkpoint, progress=False, quantization=fmt))
    for i in range(3):
        engine.add_request(f"r{i}", [5 + i, 9, 11, 2, 7], greedy(8))
    outs = run_to_completion(engine)
    assert all(len(tokens_of(outs[f"r{i}"])) == 8 for i in range(3))
    assert_no_leaks(engine)


def test_packed_weights_are_cpu_float32_only(checkpoint):
    with pytest.raises(ModelLoadError, match="CPU with float32"):
        load_model(checkpoint, dtype=torch.bfloat16, progress=False, quantization="fp16")


def test_an_unknown_weight_format_is_refused_by_name():
    from pydantic import ValidationError

    from common.config import EngineConfig

    with pytest.raises(ValidationError, match="quantization"):
        EngineConfig(quantization="int4")
