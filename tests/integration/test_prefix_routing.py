"""With two prefill workers, a repeated prefix goes where it is cached, and the gateway's
prediction (from the workers' KV events) matches what the worker reports."""

import time

import httpx

from tests.integration.conftest import assert_workers_clean


def test_repeated_prefix_follows_the_cache(cluster_factory, tiny_dir):
    import asyncio

    run = cluster_factory(tiny_dir, prefill=2)
    model = httpx.get(f"{run.url}/v1/models").json()["data"][0]["id"]
    prefix = [(7 * i) % 250 + 1 for i in range(96)]  # 6 full blocks of 16

    def send(suffix: list[int]) -> httpx.Response:
        r = httpx.post(
            f"{run.url}/v1/completions",
            timeout=30,
            json={"model": model, "prompt": prefix + suffix, "max_tokens": 2, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        return r

    first = send([1, 2, 3])
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # the stored-block events reach the gateway (pushed at once; margin for a loaded CI machine)
    time.sleep(3.0)
    chosen = {first.headers["x-kvrelay-prefill"]}
    for k in range(4):
        r = send([10 + k, 20 + k])
        chosen.add(r.headers["x-kvrelay-prefill"])
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert len(chosen) == 1, f"the prefix was sent to several workers: {chosen}"
    metrics = httpx.get(f"{run.url}/metrics").text
    predicted = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith('kvrelay_gateway_prefix_cached_tokens_total{kind="predicted"}')
    ]
    actual = [
        ln for ln in metrics.splitlines() if ln.startswith('kvrelay_gateway_prefix_cached_tokens_total{kind="actual"}')
    ]
    assert predicted and actual and predicted[0].split()[-1] == actual[0].split()[-1] == "384.0"
    asyncio.run(assert_workers_clean(run.workers()))
