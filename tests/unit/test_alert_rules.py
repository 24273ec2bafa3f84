"""Every alert is tested: promtool accepts the rules, and its unit tests (tests/promtool/) give each
alert a series that must fire it and one that must not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "base" / "observability" / "prometheus-rules.yaml"
TESTS = sorted((ROOT / "tests" / "promtool").glob("*.yaml"))


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; run `make setup` (apt-get install -y prometheus)")
    return path


def test_the_rules_pass_promtool_check():
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_alert_unit_tests_pass():
    assert TESTS, "no promtool test files"
    out = subprocess.run([_promtool(), "test", "rules", *map(str, TESTS)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    fires, quiet = set(), set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert not alerts - fires, f"alerts never shown to fire: {sorted(alerts - fires)}"
    assert not alerts - quiet, f"alerts never shown to stay quiet: {sorted(alerts - quiet)}"
