"""Which variant serves a request.

With a user key, assignment is sticky: blake2b (stable across processes and restarts, unlike
Python's salted hash()) of the route name and the key picks a bucket in [0, 10000). Non-baseline
variants hold the low buckets in list order, the baseline the rest. So one user sees one variant
while the weights stand, and raising a canary's weight only widens its range: everyone already on
it stays. Without a key, the pick is random by weight.
"""

from __future__ import annotations

import hashlib
import random

from gateway.routes.spec import BUCKETS, RouteSpec, Variant


def bucket(*parts: str) -> int:
    """A bucket in [0, BUCKETS) for these strings, the same on every replica."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def ranges(spec: RouteSpec) -> list[tuple[Variant, int]]:
    """Each variant with the upper end (exclusive) of its bucket range, canaries first."""
    total = spec.total_weight
    order = [v for v in spec.variants if v.name != spec.baseline] + [spec.variant(spec.baseline)]
    out, cumulative = [], 0
    for v in order:
        cumulative += v.weight
        out.append((v, cumulative * BUCKETS // total))
    return out


def choose(spec: RouteSpec, user_key: str | None, rng: random.Random) -> Variant:
    if user_key is None or not spec.sticky:
        return rng.choices(spec.variants, weights=[v.weight for v in spec.variants])[0]
    b = bucket(spec.name, user_key)
    return next(v for v, upper in ranges(spec) if b < upper)


def shadowed(spec: RouteSpec, request_id: str) -> bool:
    """Whether this request is also sent to the shadow model: decided by its id, so a retried
    request gets the same answer."""
    if spec.shadow is None:
        return False
    return bucket(spec.name, "shadow", request_id) < spec.shadow.percent * BUCKETS / 100
