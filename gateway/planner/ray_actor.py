"""Scaling the Ray pools through their controller actor (`kvrelay ray up` names it "controller"
in the "kvrelay" namespace): `sizes.remote()` gives each pool's size, `scale.remote(role, n)`
sets one and returns once new members serve or removed ones have drained, so a tick that scales
down waits for the drain. Ray is an optional dependency, imported only when connecting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.planner.adapters import AdapterError
from gateway.planner.signals import ROLES


class RayAdapter:
    def __init__(self, handle: Any, get: Callable[[Any], Any]) -> None:
        """`get` resolves an object ref (ray.get); tests pass a fake handle and an identity."""
        self._handle = handle
        self._get = get

    @classmethod
    def connect(cls, address: str = "auto", namespace: str = "kvrelay", actor: str = "controller") -> RayAdapter:
        try:
            import ray
        except ImportError as e:
            raise AdapterError("the ray adapter needs Ray: pip install 'kvrelay[ray]'") from e
        try:
            ray.init(address=address, namespace=namespace, ignore_reinit_error=True)
        except ConnectionError as e:
            raise AdapterError(f"no Ray cluster at {address!r}: {e} (pass --ray-address)") from e
        try:
            handle = ray.get_actor(actor, namespace=namespace)
        except ValueError as e:
            raise AdapterError(
                f"no Ray actor {actor!r} in namespace {namespace!r} at {address}: start the pools with `kvrelay ray up`"
            ) from e
        return cls(handle, ray.get)

    def current(self) -> dict[str, int]:
        sizes = self._get(self._handle.sizes.remote())
        return {role: int(sizes[role]) for role in ROLES if role in sizes}  # the gateways are not planned

    def apply(self, sizes: dict[str, int]) -> None:
        for role, n in sorted(sizes.items()):
            self._get(self._handle.scale.remote(role, n))
