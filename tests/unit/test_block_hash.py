import subprocess
import sys

from common.kv.block_hash import ROOT_HASH, block_hashes, hash_block


def test_only_full_blocks_are_hashed():
    assert block_hashes(list(range(7)), 4) == [hash_block(ROOT_HASH, [0, 1, 2, 3])]
    assert len(block_hashes(list(range(8)), 4)) == 2


def test_hash_chains_on_parent():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0]
    assert a[1] != b[1], "same block content under a different prefix must hash differently"


def test_hash_is_stable_across_processes():
    """Python's hash() is salted per process; ours must not be."""
    code = "from common.kv.block_hash import block_hashes; print(block_hashes(list(range(40)), 16))"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed)},
            cwd=".",
        ).stdout
        for seed in (1, 2)
    }
    assert len(runs) == 1
    assert runs.pop().strip() == str(block_hashes(list(range(40)), 16))


def test_known_value_does_not_drift():
    # Pinned so a change to the encoding (which would split gateway and workers) fails loudly.
    assert f"{hash_block(ROOT_HASH, [1, 2, 3, 4]):016x}" == "09222804e3e39ba2"
    assert hash_block(ROOT_HASH, (1, 2, 3, 4)) == hash_block(ROOT_HASH, [1, 2, 3, 4])
