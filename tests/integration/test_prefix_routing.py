"""With two prefill workers, a repeated prefix goes where it is cached, and the gateway's
prediction (from the workers' KV events) matches what the worker reports."""

import httpx

from tests.integration.client import routed
from tests.integration.conftest import wait_until_gateway_follows


def prefix_tokens(url: str) -> dict[str, float]:
    """The gateway's predicted and actual cached prompt tokens so far."""
    totals = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for kind in ("predicted", "actual"):
            if line.startswith(f'kvrelay_gateway_prefix_cached_tokens_total{{kind="{kind}"}}'):
                totals[kind] = float(line.split()[-1])
    return totals


def test_repeated_prefix_follows_the_cache(cluster_factory, tiny_dir):
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
    owner = routed(first, "prefill")
    wait_until_gateway_follows(run.url, owner)  # the stored-block events have reached the gateway
    before = prefix_tokens(run.url)
    chosen = {owner}
    for k in range(4):
        r = send([10 + k, 20 + k])
        chosen.add(routed(r, "prefill"))
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert len(chosen) == 1, f"the prefix was sent to several workers: {chosen}"
    after = prefix_tokens(run.url)
    assert after["predicted"] - before["predicted"] == after["actual"] - before["actual"] == 4 * 96
