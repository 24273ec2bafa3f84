"""What the repository records about a model, read from file headers only: a 135M-parameter model
is described in milliseconds, and no weight is ever loaded to describe it."""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal

from gguf import GGMLQuantizationType, LlamaFileType
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.errors import InvalidModelNameError, ModelLoadError
from common.model_source import ModelSource

NAME_RULE = "[a-z0-9][a-z0-9._-]{0,63}"
_NAME = re.compile(NAME_RULE)
METADATA_FILE = "metadata.json"
# what a safetensors model directory's loaders read: weights, configs, tokenizer files, templates
_SAFETENSORS_FILES = ("*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")


def check_name(value: str, what: str) -> str:
    """Ids and versions become directory names: keep them to a portable, unambiguous alphabet."""
    if not _NAME.fullmatch(value):
        raise InvalidModelNameError(
            f"model {what} {value!r} is invalid: it must match {NAME_RULE} (lowercase letters, digits, "
            "'.', '_' and '-', starting with a letter or digit, at most 64 characters)"
        )
    return value


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Numeric-aware order: "10" after "9", "v2" after "v1"; digit runs sort before letters."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p)


class ModelMetadata(BaseModel):
    """The contents of a version's metadata.json."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=f"^{NAME_RULE}$")
    version: str = Field(pattern=f"^{NAME_RULE}$")
    format: Literal["gguf", "safetensors"]
    architecture: str
    size_bytes: int
    parameter_count: int
    quantization: str
    sha256: dict[str, str]  # file name in the version directory -> hex digest
    added_at: datetime
    # How workers serve it unless told otherwise (EngineConfig.quantization); None: their own default.
    # The same file under two ids can so be served two ways (an int8 canary of an fp16 model, say).
    serve_quantization: Literal["none", "fp16", "int8"] | None = None

    @field_validator("sha256")
    @classmethod
    def _plain_names(cls, v: dict[str, str]) -> dict[str, str]:
        """Files live in the version directory itself: a name with a path in it could reach outside."""
        bad = [name for name in v if name in ("", ".", "..") or "/" in name or "\\" in name]
        if bad:
            raise ValueError(f"file names in sha256 must be plain names in the version directory, got {bad}")
        return v


@dataclass(frozen=True)
class ModelEntry:
    """One stored version: its metadata and the directory holding its files."""

    metadata: ModelMetadata
    path: Path

    @property
    def spec(self) -> str:
        return f"{self.metadata.id}@{self.metadata.version}"

    @property
    def weights_path(self) -> Path:
        """What the loaders take: the .gguf file, or the directory of a safetensors model."""
        if self.metadata.format == "safetensors":
            return self.path
        return self.path / next(name for name in self.metadata.sha256 if name.endswith(".gguf"))


@dataclass(frozen=True)
class WeightsInfo:
    """A model's description before it is stored, with the source files to store."""

    format: Literal["gguf", "safetensors"]
    architecture: str
    parameter_count: int
    quantization: str
    files: dict[str, Path]  # name in the version directory -> source file


def inspect_weights(source: ModelSource) -> WeightsInfo:
    if source.kind == "gguf":
        return _inspect_gguf(source.path)
    return _inspect_safetensors(source.path)


def _inspect_gguf(path: Path) -> WeightsInfo:
    try:
        fields, tensors = _gguf_header(path)
        by_type: Counter[int] = Counter()
        for elements, ggml_type in tensors:
            by_type[ggml_type] += elements
        quantization = _gguf_quantization(fields.get("general.file_type"), by_type)
    except (struct.error, KeyError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"cannot read the GGUF header of {str(path)!r}: {e!r}") from e
    architecture = str(fields.get("general.architecture", "unknown"))
    return WeightsInfo("gguf", architecture, sum(by_type.values()), quantization, {path.name: path})


def _gguf_quantization(file_type: object, elements_by_type: Counter[int]) -> str:
    """llama.cpp's name for the file type ("Q4_1", "F16"); older converters omit the field, so then
    the tensor type holding most parameters."""
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        if not elements_by_type:
            return "unknown"
        return GGMLQuantizationType(elements_by_type.most_common(1)[0][0]).name


# GGUF value types (gguf.GGUFValueType) with a fixed size, as struct formats; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_header(path: Path) -> tuple[dict[str, object], list[tuple[int, int]]]:
    """The `general.*` scalar fields and each tensor's (elements, ggml type). gguf.GGUFReader would
    take ~2.5 s on SmolLM2, building numpy views of its 49k-token vocabulary; this skips over it."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version, n_tensors, n_fields = _unpack(f, "I"), _unpack(f, "Q"), _unpack(f, "Q")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (2 or later is read)")
        fields: dict[str, object] = {}
        for _ in range(n_fields):
            key, value_type = _string(f), _unpack(f, "I")
            if key.startswith("general.") and value_type == _GGUF_STRING:
                fields[key] = _string(f)
            elif key.startswith("general.") and value_type in _GGUF_SCALARS:
                fields[key] = _unpack(f, _GGUF_SCALARS[value_type])
            else:
                _skip(f, value_type)
        tensors = []
        for _ in range(n_tensors):
            f.seek(_unpack(f, "Q"), 1)  # the name
            shape = [_unpack(f, "Q") for _ in range(_unpack(f, "I"))]
            ggml_type, _offset = _unpack(f, "I"), _unpack(f, "Q")
            tensors.append((math.prod(shape), ggml_type))
    return fields, tensors


def _unpack(f: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    return struct.unpack(f"<{fmt}", f.read(size))[0]


def _string(f: BinaryIO) -> str:
    return f.read(_unpack(f, "Q")).decode("utf-8")


def _skip(f: BinaryIO, value_type: int) -> None:
    if value_type == _GGUF_STRING:
        f.seek(_unpack(f, "Q"), 1)
    elif value_type == _GGUF_ARRAY:
        item_type, count = _unpack(f, "I"), _unpack(f, "Q")
        if item_type in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[item_type]) * count, 1)
        else:
            for _ in range(count):
                _skip(f, item_type)
    else:
        f.seek(struct.calcsize(_GGUF_SCALARS[value_type]), 1)


def _inspect_safetensors(path: Path) -> WeightsInfo:
    files = {f.name: f for pattern in _SAFETENSORS_FILES for f in sorted(path.glob(pattern)) if f.is_file()}
    by_dtype: Counter[str] = Counter()
    for name, file in files.items():
        if name.endswith(".safetensors"):
            for tensor in _safetensors_header(file).values():
                by_dtype[tensor["dtype"]] += math.prod(tensor["shape"])
    config = json.loads((path / "config.json").read_text())
    architecture = config.get("model_type") or next(iter(config.get("architectures") or []), "unknown")
    quantization = by_dtype.most_common(1)[0][0] if by_dtype else "unknown"
    return WeightsInfo("safetensors", str(architecture), sum(by_dtype.values()), quantization, files)


def _safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets}: the file's JSON header (8-byte length first)."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(_unpack(f, "Q")))
    except (struct.error, ValueError) as e:
        raise ModelLoadError(f"cannot read the safetensors header of {str(path)!r}: {e!r}") from e
    header.pop("__metadata__", None)
    return header
