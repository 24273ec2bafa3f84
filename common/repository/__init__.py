"""A filesystem model repository: models stored by id and version, with SHA-256 digests to verify."""

from common.repository.metadata import ModelEntry, ModelMetadata, check_name
from common.repository.store import (
    BUILTIN_ID,
    BUILTIN_VERSION,
    DigestMismatch,
    ModelRepository,
    default_root,
    parse_spec,
)

__all__ = [
    "BUILTIN_ID",
    "BUILTIN_VERSION",
    "DigestMismatch",
    "ModelEntry",
    "ModelMetadata",
    "ModelRepository",
    "check_name",
    "default_root",
    "parse_spec",
]
