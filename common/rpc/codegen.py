"""Generate the gRPC stubs in this folder from protos/kvrelay/v1/*.proto.

The stubs are committed (so an install needs no protoc); `make protos` regenerates them and a test
checks they are fresh. protoc writes absolute imports (`from kvrelay.v1 import x_pb2`) that would
clash with the `kvrelay` CLI package, so they are rewritten to relative ones.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
OUT = Path(__file__).resolve().parent
_ABS_IMPORT = re.compile(r"^from kvrelay\.v1 import (\w+_pb2)", re.M)


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "kvrelay" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTOS}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}", *files]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {files}")
        written = []
        for gen in sorted((Path(tmp) / "kvrelay" / "v1").iterdir()):
            target = out_dir / gen.name
            target.write_text(_ABS_IMPORT.sub(r"from . import \1", gen.read_text()))
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path)
