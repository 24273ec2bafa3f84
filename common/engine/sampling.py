"""Sampling parameters of one request, validated once at the edge of the engine.

Integers are bounded by what the wire to a worker carries (uint32, int64: see types.proto), floats
must be finite: a value outside either is a clear error here, never an overflow in a serializer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.errors import InvalidRequestError

UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties, as in OpenAI's API
REPETITION_MAX = 10.0  # beyond ~2 every seen token is already all but banned; a bound keeps float32 exact enough
BIAS_RANGE = (-100.0, 100.0)  # logit_bias values, as in OpenAI's API


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature == 0 means greedy (penalties and logit_bias
    still apply, as in vLLM: they change which token is the argmax)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token in the output
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), sorted by id
    # The last N prompt tokens were generated earlier (a stream migrated here with them): the output
    # penalties count them as output.
    prior_output_tokens: int = 0
    # The tenant's prefix-cache salt: blocks cached under one salt are never hits for another.
    cache_salt: str = ""

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
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: Mapping[int | str, float] | Sequence[tuple[int, float]] | None = None,
        cache_salt: str = "",
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
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logit_bias=_normalize_logit_bias(logit_bias),
            cache_salt=cache_salt,
        )
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the sampler must change this request's logits before picking (the fast path skips it)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )

    @property
    def needs_output_counts(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def validate(self) -> None:
        if not _is_int(self.max_tokens) or not 0 < self.max_tokens <= UINT32_MAX:
            raise InvalidRequestError(
                f"max_tokens must be a positive integer (at most {UINT32_MAX}), got {self.max_tokens!r}", "max_tokens"
            )
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}", "temperature"
            )
        if not _is_finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= UINT32_MAX:
            raise InvalidRequestError(
                f"top_k must be an integer >= 0 and <= {UINT32_MAX} (0 disables it), got {self.top_k!r}", "top_k"
            )
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise InvalidRequestError(
                f"seed must be null or an integer in [-2**63, 2**63 - 1], got {self.seed!r}", "seed"
            )
        for tid in self.stop_token_ids:
            if not _is_int(tid) or not 0 <= tid <= UINT32_MAX:
                raise InvalidRequestError(
                    f"stop_token_ids must hold token ids (non-negative integers), got {tid!r}", "stop_token_ids"
                )
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_finite(value) or not lo <= value <= hi:
                raise InvalidRequestError(f"{name} must be in [{lo:g}, {hi:g}] (0 is off), got {value!r}", name)
        if not _is_finite(self.repetition_penalty) or not 0 < self.repetition_penalty <= REPETITION_MAX:
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, {REPETITION_MAX:g}] (1 is off), got {self.repetition_penalty!r}",
                "repetition_penalty",
            )
        lo, hi = BIAS_RANGE
        for tid, bias in self.logit_bias:
            if not _is_int(tid) or not 0 <= tid <= UINT32_MAX:
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids (integers >= 0), got {tid!r}", "logit_bias"
                )
            if not _is_finite(bias) or not lo <= bias <= hi:
                raise InvalidRequestError(
                    f"logit_bias values must be in [{lo:g}, {hi:g}], got {bias!r} for token {tid}", "logit_bias"
                )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _normalize_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """A JSON object's keys are strings ("50256": -100), so decimal-string token ids are accepted."""
    if bias is None:
        return ()
    if isinstance(bias, Mapping):
        items = list(bias.items())
    elif isinstance(bias, list | tuple):
        items = list(bias)
    else:
        raise InvalidRequestError(f"logit_bias must map token ids to biases, got {type(bias).__name__}", "logit_bias")
    out: dict[int, float] = {}
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise InvalidRequestError(f"logit_bias entries must be (token id, bias) pairs, got {item!r}", "logit_bias")
        tid, value = item
        if isinstance(tid, str):
            if not (tid.isascii() and tid.isdecimal()) or len(tid) > 10:  # 10 digits: any uint32
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {tid!r}", "logit_bias")
            tid = int(tid)
        out[tid] = value
    return tuple(sorted(out.items(), key=lambda kv: kv[0] if _is_int(kv[0]) else -1))


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
