"""What a route is: a public model name split over served models (variants) by weight, with an
optional shadow copy of some traffic and the SLO judge's thresholds.

A route also carries its state: `revision` (bumped by every write, so writers can compare and set),
`changed_at` (when its weights last changed: the judge promotes only after healthy time since then)
and `rolled_back` (what the judge did and why; it leaves the route alone until an operator sets it
again)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUCKETS = 10_000  # assignment resolution: weights map onto this many hash buckets


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    model: str = Field(min_length=1, description="the served model id requests of this variant go to")
    weight: int = Field(ge=0)


class Shadow(BaseModel):
    """A copy of some requests sent to another model; its answers are discarded, only measured."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    percent: float = Field(ge=0, le=100)


class JudgeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    min_requests: int = Field(20, ge=1, description="per variant, in the window, before it is judged")
    window_s: float = Field(60.0, gt=0)
    max_error_rate_delta: float = Field(0.05, ge=0, le=1)
    max_ttft_p95_ratio: float = Field(1.5, gt=0)
    max_tpot_p95_ratio: float = Field(1.5, gt=0)
    promote_steps: list[int] = Field(default_factory=list, description="canary weights, in percent, to step through")
    promote_after_s: float = Field(120.0, ge=0)

    @field_validator("promote_steps")
    @classmethod
    def _steps_rise_to_at_most_100(cls, steps: list[int]) -> list[int]:
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"promote steps are percentages in 1..100, got {steps}")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"promote steps must strictly increase, got {steps}")
        return steps


class RollbackRecord(BaseModel):
    variant: str
    reason: str
    at: float
    evidence: dict[str, float | int | None] = Field(default_factory=dict)


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="the public model name clients send")
    variants: list[Variant] = Field(min_length=1)
    baseline: str = Field("", description="the variant rollbacks fall back to (default: the first)")
    sticky: bool = True
    shadow: Shadow | None = None
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    rolled_back: RollbackRecord | None = None
    revision: int = Field(0, ge=0)
    changed_at: float = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> RouteSpec:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("the variants' weights must add up to more than 0")
        if not self.baseline:
            self.baseline = names[0]
        elif self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants ({', '.join(names)})")
        return self

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def total_weight(self) -> int:
        return sum(v.weight for v in self.variants)

    def share(self, variant: Variant) -> float:
        """The variant's share of traffic, in percent."""
        return 100.0 * variant.weight / self.total_weight


def parse_variants(text: str) -> list[Variant]:
    """The CLI's compact form, `stable=modelA:90,canary=modelB:10` (a model id may itself hold ':')."""
    variants = []
    for part in (p.strip() for p in text.split(",")):
        name, eq, rest = part.partition("=")
        model, colon, weight = rest.rpartition(":")
        if not (eq and colon and name.strip() and model.strip() and weight.strip().isdigit()):
            raise ValueError(f"variant {part!r} should look like NAME=MODEL:WEIGHT, e.g. canary=modelB:10")
        variants.append(Variant(name=name.strip(), model=model.strip(), weight=int(weight)))
    return variants


def parse_shadow(text: str) -> Shadow:
    """`MODEL:PERCENT`, e.g. `modelC:5`."""
    model, colon, percent = text.rpartition(":")
    try:
        value = float(percent)
    except ValueError:
        value = None
    if not colon or not model or value is None:
        raise ValueError(f"shadow {text!r} should look like MODEL:PERCENT, e.g. modelC:5")
    return Shadow(model=model, percent=value)


def explain(error: ValidationError) -> str:
    """A validation error as one line a user can act on (where, then what)."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)
