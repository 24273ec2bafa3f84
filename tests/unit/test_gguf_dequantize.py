"""The loader dequantizes large GGUF tensors a chunk of rows at a time (so a whole-matrix
dequantization's intermediates never set the load's peak): the chunks must add up to exactly what
one whole dequantization gives, for quantized blocks and for read-only unquantized views alike."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from common.model.loader import dequantize_tensor


@pytest.mark.parametrize("rows", [1, 7, 10, 64])
def test_chunked_dequantization_equals_the_whole(rows):
    weights = np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32)
    data = quantize(weights, GGMLQuantizationType.Q8_0)
    got = dequantize_tensor(data, GGMLQuantizationType.Q8_0, rows_per_chunk=rows)
    assert got.shape == (10, 64)
    assert torch.equal(got, torch.from_numpy(dequantize(data, GGMLQuantizationType.Q8_0)))


def test_unquantized_read_only_views_come_back_writable():
    weights = np.random.default_rng(1).standard_normal((9, 16)).astype(np.float32)
    weights.flags.writeable = False  # as a view of the file's read-only mapping is
    for rows in (4, 100):  # chunked and whole
        got = dequantize_tensor(weights, GGMLQuantizationType.F32, rows_per_chunk=rows)
        assert torch.equal(got, torch.from_numpy(weights.copy()))
        got.add_(1.0)  # owns its memory
