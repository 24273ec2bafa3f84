"""The scheduler's YAML: which filters and weighted scorers each profile uses, and the knobs of
the picker, the imbalance guard and the P/D decider. Validated at start; errors name the key.

    profiles:
      prefill:
        filters: [health, not-draining, model, pool, layout, kv-fit, stream-limit]
        scorers: [{type: prefix-cache, weight: 2}, {type: queue-depth, weight: 1}, {type: kv-usage, weight: 1}]
        picker: {type: max-score, temperature: 0}
      decode:
        filters: [health, not-draining, model, pool, layout, kv-fit]
        scorers: [{type: kv-usage, weight: 1}, {type: running, weight: 1}, {type: kv-fit, weight: 1},
                  {type: model-loaded, weight: 4}]
    imbalance: {absolute: 4, relative: 1.5}
    decider: {min_uncached_tokens: 32, max_prefill_waiting: 8}
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.scheduling.filters import FILTERS
from gateway.scheduling.picker import PICKERS
from gateway.scheduling.scorers import SCORER_TYPES


class SchedulerConfigError(ValueError):
    """The scheduler YAML is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _registered(kind: str, name: str, registry: Iterable[str]) -> str:
    """`name` if a plugin of that kind is registered under it; else an error listing those that are."""
    names = list(registry)
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(names)}")
    return name


class ScorerSpec(_Strict):
    type: str
    weight: float = Field(1.0, ge=0.0)

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered("scorer", v, SCORER_TYPES)


class PickerSpec(_Strict):
    type: str = "max-score"
    temperature: float = Field(0.0, ge=0.0)

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered("picker", v, PICKERS)


class ProfileSpec(_Strict):
    filters: list[str] = Field(
        default_factory=lambda: ["health", "not-draining", "model", "pool", "layout", "kv-fit", "stream-limit"]
    )
    scorers: list[ScorerSpec]
    picker: PickerSpec = Field(default_factory=PickerSpec)

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, v: list[str]) -> list[str]:
        return [_registered("filter", f, sorted(FILTERS)) for f in v]


class ImbalanceSpec(_Strict):
    absolute: int = Field(4, ge=0)
    relative: float = Field(1.5, ge=1.0)


class DeciderSpec(_Strict):
    enabled: bool = True  # false: always prefill -> decode when a prefill worker is up
    min_uncached_tokens: int = Field(32, ge=0)
    max_prefill_waiting: int = Field(8, ge=1)


class Profiles(_Strict):
    prefill: ProfileSpec
    decode: ProfileSpec


class SchedulerConfig(_Strict):
    profiles: Profiles
    imbalance: ImbalanceSpec = Field(default_factory=ImbalanceSpec)
    decider: DeciderSpec = Field(default_factory=DeciderSpec)


DEFAULT = {
    "profiles": {
        "prefill": {
            "scorers": [
                {"type": "prefix-cache", "weight": 2.0},
                {"type": "queue-depth", "weight": 1.0},
                {"type": "kv-usage", "weight": 1.0},
                {"type": "inflight-tokens", "weight": 1.0},
                {"type": "model-loaded", "weight": 4.0},
            ]
        },
        "decode": {
            "scorers": [
                {"type": "kv-usage", "weight": 1.0},
                {"type": "running", "weight": 1.0},
                {"type": "kv-fit", "weight": 1.0},
                {"type": "model-loaded", "weight": 4.0},
            ]
        },
    },
}


def parse_config(data: object) -> SchedulerConfig:
    try:
        return SchedulerConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise SchedulerConfigError(f"scheduler config: {key}: {err['msg']}") from e


def load_config(path: str | Path | None) -> SchedulerConfig:
    if path is None:
        return parse_config(DEFAULT)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SchedulerConfigError(f"scheduler config {str(path)!r}: {e}") from e
    return parse_config(data)
