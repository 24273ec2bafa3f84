"""The committed gRPC stubs are exactly what protos/ generates."""

import pytest

from common.rpc import codegen


def test_committed_stubs_match_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    generated = codegen.generate(tmp_path)
    assert generated, "no stubs generated"
    for path in generated:
        committed = codegen.OUT / path.name
        assert committed.exists(), f"{path.name} is generated but not committed; run `make protos`"
        assert committed.read_text() == path.read_text(), f"{path.name} is stale; run `make protos`"
    stale = {p.name for p in codegen.OUT.glob("*_pb2*.py*")} - {p.name for p in generated}
    assert not stale, f"stubs without a proto: {stale}"
