"""`kvrelay plan` end to end: a real HTTP server serving gateway metrics, the typer app."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from kvrelay.plan_command import plan_app
from tests.unit.test_planner_scrape import serve_metrics
from tests.unit.test_planner_signals import FakeGateway


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The command configures logging onto the runner's stderr; put the root logger back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def gateway_url() -> Iterator[str]:
    gw = FakeGateway().pool("prefill", 2, 3.0, 1, 0.0).pool("decode", 3, 40, 0, 0.3)
    gw.serve(ttft=0.5, tpot=0.02, n=50)
    server, url = serve_metrics(gw.text())
    yield url
    server.shutdown()
    server.server_close()


def test_once_prints_each_pools_recommendation(gateway_url):
    result = CliRunner().invoke(plan_app, ["--gateway", gateway_url, "--once"])
    assert result.exit_code == 0, result.output
    assert "prefill 2 -> 4: running/worker 1.5 vs target 0.75" in result.output
    assert "decode 3 -> 2: kv usage 0.3 vs target 0.7" in result.output
    assert "not applied" not in result.output  # --once looks, it never applies


def test_once_respects_the_limits_given(gateway_url):
    args = ["--gateway", gateway_url, "--once", "--max-prefill", "3", "--min-decode", "3"]
    result = CliRunner().invoke(plan_app, args)
    assert result.exit_code == 0, result.output
    assert "prefill 2 -> 3" in result.output and "decode stays at 3" in result.output


def test_no_gateway_answering_is_an_error():
    server, url = serve_metrics("")
    server.shutdown()
    server.server_close()
    result = CliRunner().invoke(plan_app, ["--gateway", url, "--once"])
    assert result.exit_code == 1 and f"no gateway answered at {url}/metrics" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "nomad"], "use one of dry-run, kubernetes, ray"),
        (["--min-prefill", "0"], "1 <= min <= max"),
        (["--min-decode", "5", "--max-decode", "2"], "min 5, max 2"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(args, message):
    result = CliRunner().invoke(plan_app, ["--gateway", "http://127.0.0.1:9", "--once", *args])
    assert result.exit_code == 2 and message in result.output
