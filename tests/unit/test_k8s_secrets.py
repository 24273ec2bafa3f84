"""No secret is committed, and every Secret the manifests use is one k8s/README.md says how to make:
no rendering contains a Secret with data, no file git would commit holds a private key or a Secret
with data, and the directory where make-secrets.sh writes is git-ignored."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.test_k8s_render import pod_templates, renders

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def committable_files() -> list[Path]:
    """Files git would commit: tracked, or untracked and not ignored."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot tell committed files from ignored ones")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return [ROOT / p for p in out.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


def secret_with_data(doc: object) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == "Secret" and bool(doc.get("data") or doc.get("stringData"))


def referenced_secrets(template: dict) -> set[str]:
    spec = template["spec"]
    names = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    for c in spec["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    return names


def test_no_rendering_contains_secret_data():
    for name, docs in renders(include_ray=True).items():
        assert not [d for d in docs if secret_with_data(d)], f"{name} renders a Secret with data"


def test_no_committable_file_holds_a_key_or_secret_data():
    files = committable_files()
    assert any(f.name == "kustomization.yaml" for f in files)
    offenders = []
    for f in files:
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if PRIVATE_KEY.search(text):
            offenders.append(f"{f.relative_to(ROOT)}: a private key")
        if f.suffix in (".yaml", ".yml") and "kind: Secret" in text:
            try:
                docs = list(yaml.safe_load_all(text))
            except yaml.YAMLError:
                continue
            if any(secret_with_data(d) for d in docs):
                offenders.append(f"{f.relative_to(ROOT)}: a Secret with data")
    assert not offenders, offenders


def test_the_key_pattern_matches_real_keys():
    key = "PRIVATE " + "KEY"  # spelled apart, so that this file does not match itself
    assert PRIVATE_KEY.search(f"-----BEGIN EC {key}-----\nMHc...")
    assert PRIVATE_KEY.search(f"-----BEGIN {key}-----")
    assert not PRIVATE_KEY.search("-----BEGIN CERTIFICATE-----")


def test_the_secrets_directory_is_ignored():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    for path in ("compose/secrets/tls.key", "compose/secrets/redis_password"):
        out = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert out.returncode == 0, f"{path} would be committed"


def test_every_secret_used_is_documented():
    readme = (ROOT / "k8s" / "README.md").read_text()
    documented = set(re.findall(r"create secret (?:generic|tls) ([a-z0-9-]+)", readme))
    used = set()
    for docs in renders(include_ray=True).values():
        for template in pod_templates(docs).values():
            used |= referenced_secrets(template)
    assert {"kvrelay-redis", "kvrelay-shared-secret", "kvrelay-tls", "kvrelay-gateway-https"} <= used
    assert used <= documented, f"Secrets the README does not say how to create: {used - documented}"
