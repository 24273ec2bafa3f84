"""Several models behind one gateway: workers that hold two models within a memory budget that fits
one, loading on demand and evicting the idle one; each request answered by the model it names."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
import pytest

from common.config import EngineConfig
from common.engine.factory import build_engine
from common.engine.sampling import SamplingParams
from common.repository.store import ModelRepository
from kvrelay.launcher import Cluster, free_worker_ports
from tests.helpers import assert_no_leaks, run_to_completion, tokens_of
from tests.integration.client import chat_token_ids, metric
from tests.tiny_checkpoint import write_tiny_checkpoint
from tests.waiting import async_wait_for

QUESTION = "which model are you?"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("two-models")
    return [str(write_tiny_checkpoint(root / name, seed=i)) for i, name in enumerate(("tiny-a", "tiny-b"))]


def reference(model_dir: str, max_tokens: int) -> list[int]:
    engine = build_engine(EngineConfig(model=model_dir, kv_cache_mb=1), progress=False)
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    engine.add_request("ref", ids, SamplingParams.create(max_tokens=max_tokens))
    out = tokens_of(run_to_completion(engine)["ref"])
    assert_no_leaks(engine)
    return out


async def decode_holds(client: httpx.AsyncClient, url: str, models: list[str]) -> bool:
    """Whether the gateway sees its decode workers holding exactly `models` (routing follows this)."""
    loaded = (await client.get(f"{url}/ready")).json()["workers"]["decode"]["loaded"]
    return bool(loaded) and all(held == models for held in loaded.values())


def test_two_models_share_workers_within_a_budget_of_one(cluster_factory, two_models, tmp_path):
    # ~1.5 MB a model (1 MB of KV cache, the weights): a 2 MB budget holds one at a time.
    worker = ["--models", ",".join(two_models), "--kv-cache-mb", "1", "--memory-budget-mb", "2"]
    config = tmp_path / "gateway.yaml"
    config.write_text("health_interval_s: 0.2\n")  # the gateway learns which models are loaded from Stats
    run = cluster_factory(
        None,
        prefill_extra=worker,
        decode_extra=worker,
        gateway_extra=["--models", ",".join(two_models), "--config", str(config)],
    )
    want = {name: reference(path, 12) for name, path in zip(("tiny-a", "tiny-b"), two_models, strict=True)}
    assert want["tiny-a"] != want["tiny-b"]

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            listed = (await client.get(f"{run.url}/v1/models")).json()["data"]
            assert [m["id"] for m in listed] == ["tiny-a", "tiny-b"]
            # Each switch loads one model and evicts the other on both workers. The first request after a
            # switch finds its model cold on the decode worker, which then prefills it itself (a load
            # would outlast the prefill side's KV lease); the next one goes prefill -> decode.
            order = ["tiny-a", "tiny-b", "tiny-b", "tiny-a", "tiny-a", "tiny-b", "tiny-b"]
            for i, name in enumerate(order):
                # the mode below follows the gateway's view of what the decode worker holds: wait until
                # it shows only the last model asked for (tiny-a, preloaded, before the first request)
                held = ["tiny-a" if i == 0 else order[i - 1]]
                await async_wait_for(lambda held=held: decode_holds(client, run.url, held), what=f"decode holds {held}")
                ids, mode = await chat_token_ids(client, run.url, name, QUESTION, 12, stream=bool(i % 2))
                assert ids == want[name], name
                assert mode == ("disaggregated" if i in (0, 2, 4, 6) else "colocated"), (i, name, mode)
            r = await client.post(
                f"{run.url}/v1/chat/completions",
                json={"model": "tiny-c", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            assert "tiny-a" in r.json()["error"]["message"]

    asyncio.run(main())
    for worker_addr in run.workers():
        host, port = worker_addr.rsplit(":", 1)
        metrics_url = f"http://{host}:{int(port) + 1000}"
        loads = {m: metric(metrics_url, "kvrelay_worker_model_loads_total", model=m) for m in ("tiny-a", "tiny-b")}
        evictions = metric(metrics_url, "kvrelay_worker_model_evictions_total", model="tiny-a")
        assert loads["tiny-a"] >= 2 and loads["tiny-b"] >= 2 and evictions >= 2, (worker_addr, loads, evictions)
        assert (
            metric(metrics_url, "kvrelay_worker_model_loaded", model="tiny-a")
            + metric(metrics_url, "kvrelay_worker_model_loaded", model="tiny-b")
            == 1.0
        )


def test_a_worker_refuses_a_model_whose_digest_does_not_match(tmp_path, two_models, model_repository):
    entry = ModelRepository(model_repository).add(two_models[0], "tampered", progress=False)
    weights = next(entry.path.glob("*.safetensors"))
    weights.unlink()  # a hard link shares the fixture's bytes: write a changed copy instead
    data = bytearray(Path(two_models[0], weights.name).read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    cluster = Cluster(log_dir=str(tmp_path))
    try:
        cluster.worker("decode", free_worker_ports(1)[0], 1, "tampered")
        proc = cluster.procs[0][1]
        assert proc.wait(60) == 2
        log = next(tmp_path.glob("decode-*.log")).read_text()
        assert "failed its integrity check" in log and weights.name in log
        assert entry.metadata.sha256[weights.name] in log  # the expected digest, and the one found
        assert hashlib.sha256(bytes(data)).hexdigest() in log
    finally:
        cluster.stop()
