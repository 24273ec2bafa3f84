import pytest
import torch

from common.kv.cache import KVCache
from common.kv.layout import KVLayout, KVLayoutMismatchError

LAYOUT = KVLayout("m", "float32", 4, 2, 2, 8)


def test_read_blocks_contiguous_and_scattered_agree_with_the_tensor():
    cache = KVCache(LAYOUT, 10)
    cache.tensor.copy_(torch.randn_like(cache.tensor))
    assert torch.equal(cache.read_blocks([3, 4, 5]), cache.tensor[3:6])
    assert torch.equal(cache.read_blocks([7, 2, 9]), torch.stack([cache.tensor[i] for i in (7, 2, 9)]))


def test_write_blocks_round_trip_and_shape_check():
    src, dst = KVCache(LAYOUT, 6), KVCache(LAYOUT, 6)
    src.tensor.copy_(torch.randn_like(src.tensor))
    dst.write_blocks([5, 0], src.read_blocks([1, 2]))
    assert torch.equal(dst.tensor[5], src.tensor[1]) and torch.equal(dst.tensor[0], src.tensor[2])
    with pytest.raises(ValueError, match="expected"):
        dst.write_blocks([1], src.read_blocks([1, 2]))


def test_block_bytes_and_layout_mismatch_message():
    assert LAYOUT.block_bytes == 2 * 2 * 4 * 2 * 8 * 4
    other = KVLayout("m", "bfloat16", 16, 2, 2, 8)
    with pytest.raises(KVLayoutMismatchError) as err:
        LAYOUT.check_compatible(other)
    assert "dtype: 'float32' != 'bfloat16'" in str(err.value) and "block_size: 4 != 16" in str(err.value)
    LAYOUT.check_compatible(KVLayout("m", "float32", 4, 2, 2, 8))


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_cache_becomes_resident_only_as_blocks_are_written():
    layout = KVLayout("m", "float32", 16, 8, 4, 64)  # 256 KiB a block
    before = _rss_mb()
    cache = KVCache(layout, 1200)  # 300 MiB
    assert _rss_mb() - before < 30
    assert cache.tensor[::97].abs().sum().item() == 0.0  # unwritten blocks read as zeros
    cache.write_blocks(list(range(100)), torch.ones(100, *cache.tensor.shape[1:]))  # 25 MiB
    grown = _rss_mb() - before
    assert 20 < grown < 60, grown
