"""The models this gateway serves, by the names clients use: each with its tokenizer and context
window (so requests are checked and tokenized here, never on a worker), and its Preparer.

A model is named by its id (what workers call it: a repository id, or a file's stem); the first
may also have an alias (`served_model_name`). Routes (gateway/routes/) add public names that map
to these models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.model.gguf_meta import context_length
from common.model_source import DEFAULT_GGUF_NAME, ModelSource, resolve_model
from common.repository.store import BUILTIN_ID
from common.settings import GatewaySettings
from common.tokenizer import Tokenizer
from gateway.errors import APIError
from gateway.prepare import Preparer

log = logging.getLogger(__name__)
MAX_DEFAULT_CONTEXT = 8192
_LEGACY_BUILTIN = Path(DEFAULT_GGUF_NAME).stem


@dataclass(frozen=True)
class ServedModel:
    model_id: str  # what workers call it
    max_model_len: int
    preparer: Preparer

    @property
    def tokenizer(self) -> Tokenizer:
        return self.preparer.tokenizer


class ModelCatalog:
    def __init__(self, settings: GatewaySettings) -> None:
        specs = settings.models or [settings.model]
        self.models: dict[str, ServedModel] = {}
        self.aliases: dict[str, str] = {}
        tokenizers: dict[ModelSource, Tokenizer] = {}
        for spec in specs:
            source = resolve_model(spec)
            if source.model_id in self.models:
                raise ValueError(f"model {source.model_id!r} is listed twice")
            key = ModelSource(source.kind, source.path)  # one tokenizer per file, whatever its ids
            tokenizer = tokenizers.get(key) or tokenizers.setdefault(key, Tokenizer.from_source(source))
            max_len = settings.max_model_len or min(context_length(source), MAX_DEFAULT_CONTEXT)
            self.models[source.model_id] = ServedModel(
                source.model_id, max_len, Preparer(tokenizer, source.model_id, max_len, settings)
            )
        if settings.served_model_name and settings.served_model_name != self.default.model_id:
            self.aliases[settings.served_model_name] = self.default.model_id
        # The built-in model's name before the repository existed: clients that still send it are served.
        self.legacy = {_LEGACY_BUILTIN: BUILTIN_ID} if BUILTIN_ID in self.models else {}

    @property
    def default(self) -> ServedModel:
        return next(iter(self.models.values()))

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(self.aliases.get(name) or self.legacy.get(name) or name)

    def names(self) -> list[str]:
        """What /v1/models lists: each model by its alias if it has one, else its id."""
        by_alias = {model_id: alias for alias, model_id in self.aliases.items()}
        return [by_alias.get(m, m) for m in self.models]

    def not_found(self, name: str, also: list[str] | None = None) -> APIError:
        available = sorted(self.names() + (also or []))
        return APIError(
            404, f"model {name!r} does not exist; available: {available}", param="model", code="model_not_found"
        )
