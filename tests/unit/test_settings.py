"""One typed settings object per role: flags over KVRELAY_* environment over YAML over defaults."""

import pytest
from pydantic import ValidationError

from common.settings import GatewaySettings, WorkerSettings, load_settings


def test_precedence_flags_env_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "worker.yaml"
    cfg.write_text("role: prefill\nport: 1111\nengine:\n  block_size: 32\n  threads: 3\n  kv_cache_mb: 64\n")
    monkeypatch.setenv("KVRELAY_PORT", "2222")
    monkeypatch.setenv("KVRELAY_ENGINE__THREADS", "5")
    s = load_settings(WorkerSettings, cfg, engine={"kv_cache_mb": 128, "threads": None})
    assert s.role == "prefill"  # YAML
    assert s.port == 2222  # env beats YAML
    assert s.engine.threads == 5  # nested env beats YAML; a None flag means "not given"
    assert s.engine.block_size == 32  # YAML, deep-merged with the other sources
    assert s.engine.kv_cache_mb == 128  # flag beats all


def test_defaults_and_address():
    s = load_settings(WorkerSettings)
    assert s.port == 50061 and s.transfer == "grpc" and s.address == "127.0.0.1:50061"
    assert load_settings(WorkerSettings, role="prefill").port == 50051
    g = load_settings(GatewaySettings, prefill=["h:1"], decode=["h:2"])
    assert g.port == 8000 and g.prefill == ["h:1"]


def test_bad_settings_are_rejected_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_settings(WorkerSettings, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  dtype: float8\n")
    with pytest.raises(ValidationError, match="dtype"):
        load_settings(WorkerSettings, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("prot: 5\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(WorkerSettings, typo)
    with pytest.raises(ValidationError, match="transfer"):
        load_settings(WorkerSettings, transfer="carrier-pigeon")


def test_cli_flags_left_unset_do_not_override_env(monkeypatch):
    """The role commands pass None for flags not given, so KVRELAY_PORT wins over the built-in default."""
    monkeypatch.setenv("KVRELAY_PORT", "4321")
    assert load_settings(WorkerSettings, role="prefill", port=None).port == 4321


def test_registry_settings(monkeypatch):
    monkeypatch.setenv("KVRELAY_REGISTRY", "redis://127.0.0.1:6390/0")
    s = load_settings(WorkerSettings, role="decode")
    assert s.registry == "redis://127.0.0.1:6390/0" and s.heartbeat_s < s.registry_ttl_s
    assert load_settings(GatewaySettings).registry == "redis://127.0.0.1:6390/0"
    with pytest.raises(ValidationError, match="heartbeat_s"):
        load_settings(WorkerSettings, heartbeat_s=5.0, registry_ttl_s=2.0)


def test_registry_urls_lose_their_password_in_messages():
    from common.discovery.redis_client import redacted

    assert redacted("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert (
        redacted("rediss://user:pw@h:6380/0?ssl_ca_certs=/ca.pem") == "rediss://user:***@h:6380/0?ssl_ca_certs=/ca.pem"
    )
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
