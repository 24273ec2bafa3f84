"""Where a recommendation goes: the adapter contract, and the dry run that applies nothing.

The Kubernetes and Ray adapters live in kubernetes.py and ray_actor.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class AdapterError(RuntimeError):
    """The platform refused or could not be reached; the message says what to fix."""


class ScaleAdapter(Protocol):
    def current(self) -> dict[str, int]:
        """The size each pool is set to (not how many workers are up yet). Pools the adapter cannot
        tell are left out; the planner then takes the healthy workers the gateways see."""
        ...

    def apply(self, sizes: dict[str, int]) -> None:
        """Set the pools named in `sizes` to those sizes."""
        ...


class DryRunAdapter:
    """Prints what would be applied. It remembers those sizes and reports them as current, so a
    long dry run shows the timeline the planner would have produced, damping included."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self._out = out
        self._sizes: dict[str, int] = {}

    def current(self) -> dict[str, int]:
        return dict(self._sizes)

    def apply(self, sizes: dict[str, int]) -> None:
        self._sizes.update(sizes)
        settings = ", ".join(f"{role}={n}" for role, n in sorted(sizes.items()))
        self._out(f"dry run, not applied: {settings}")
