"""Sampling parameters of one request, validated once at the edge of the engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from common.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature == 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @classmethod
    def create(
        cls,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
    ) -> SamplingParams:
        """Build from loosely typed input (an API body), raising InvalidRequestError on bad values."""
        params = cls(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=_normalize_stop(stop),
            stop_token_ids=tuple(stop_token_ids or ()),
            ignore_eos=ignore_eos,
        )
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}", "temperature"
            )
        if not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}", "top_k")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer or null, got {self.seed!r}", "seed")
        for tid in self.stop_token_ids:
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise InvalidRequestError(
                    f"stop_token_ids must hold non-negative integers, got {tid!r}", "stop_token_ids"
                )


def _normalize_stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stops: tuple[object, ...] = (stop,)
    elif isinstance(stop, list | tuple):
        stops = tuple(stop)
    else:
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {type(stop).__name__}", "stop")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(f"stop entries must be non-empty strings, got {s!r}", "stop")
    return tuple(stops)  # type: ignore[arg-type]


@dataclass
class GenerationRequest:
    """What a service hands the engine: token ids in, tokens out."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
