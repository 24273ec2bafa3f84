"""The gateway stays small: it must never import torch. And common never imports a service."""

import pathlib
import subprocess
import sys


def test_gateway_does_not_import_torch():
    code = (
        "import sys, gateway.app, gateway.server, common.kv.block_hash, common.tokenizer\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(bad[:3]); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"gateway pulled in torch: {r.stdout} {r.stderr[-500:]}"


def test_common_imports_no_service():
    services = ("gateway", "prefill_worker", "decode_worker", "kvtransfer", "bench", "kvrelay")
    offenders = []
    for path in pathlib.Path("common").rglob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ", "from ")) and s.split()[1].split(".")[0] in services:
                offenders.append(f"{path}: {s}")
    assert not offenders, offenders


def test_workers_do_not_import_the_gateway():
    for pkg in ("prefill_worker", "decode_worker", "kvtransfer"):
        for path in pathlib.Path(pkg).rglob("*.py"):
            assert "from gateway" not in path.read_text() and "import gateway" not in path.read_text(), path


def test_the_kv_layer_knows_nothing_of_the_engine():
    """common/kv is the cache and its accounting; the engine uses it, never the other way round."""
    offenders = [
        f"{path}: {line.strip()}"
        for path in pathlib.Path("common/kv").rglob("*.py")
        for line in path.read_text().splitlines()
        if line.strip().startswith(("import common.engine", "from common.engine", "from common.model"))
    ]
    assert not offenders, offenders


def test_services_reach_the_engine_only_through_its_port():
    """Workers and transports use AsyncEngine's own methods, never the LLMEngine inside it."""
    for pkg in ("prefill_worker", "decode_worker", "kvtransfer", "common/serving"):
        for path in pathlib.Path(pkg).rglob("*.py"):
            assert "engine.engine." not in path.read_text(), path
