"""The committed gRPC stubs are exactly what protos/ generates."""

import subprocess
import sys

import pytest

from common.rpc import codegen


def test_committed_stubs_match_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    # In a process of its own: grpc_tools' compiler, loaded beside the protobuf runtime and torch that
    # earlier tests imported, can crash the interpreter.
    out = subprocess.run(
        [sys.executable, "-m", "common.rpc.codegen", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=codegen.ROOT,
    )
    generated = [tmp_path / line.rsplit("/", 1)[-1] for line in out.stdout.split()]
    assert generated, "no stubs generated"
    for path in generated:
        committed = codegen.OUT / path.name
        assert committed.exists(), f"{path.name} is generated but not committed; run `make protos`"
        assert committed.read_text() == path.read_text(), f"{path.name} is stale; run `make protos`"
    stale = {p.name for p in codegen.OUT.glob("*_pb2*.py*")} - {p.name for p in generated}
    assert not stale, f"stubs without a proto: {stale}"
