"""Which workers of a large pool are worth scoring for one request.

Scoring every worker costs a visit per worker per request: fine for tens, too slow for a thousand.
Above `full_below` workers, the scheduler scores a shortlist instead:
- the workers holding the longest cached prefix of the prompt (from the prefix index, found by
  block rather than by worker), so cache affinity is never lost to sampling;
- the least loaded workers, by the Stats of the last poll;
- a few drawn at random, so that load the Stats do not show yet spreads out instead of piling
  onto the same head of the list between two polls.
The filters, scorers and picker then run unchanged on the shortlist.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.scheduling.prefix_index import PrefixIndex


@dataclass(frozen=True)
class ShortlistConfig:
    full_below: int = 16  # pools up to this size are scored whole
    prefix_holders: int = 4
    least_loaded: int = 8
    random: int = 4


def shortlist(
    by_load: Sequence[str],
    block_hashes: Sequence[int],
    index: PrefixIndex,
    rng: random.Random,
    config: ShortlistConfig = ShortlistConfig(),
) -> set[str] | None:
    """The ids to score, or None when the pool is small enough to score whole. `by_load` is the
    whole pool, least loaded first (ordered once per poll, not per request)."""
    if len(by_load) <= config.full_below:
        return None
    members = set(by_load)
    ranked = [w for w, _ in index.holders_by_match(block_hashes, 4 * config.prefix_holders) if w in members]
    chosen = set(ranked[: config.prefix_holders])
    chosen.update(by_load[: config.least_loaded])
    chosen.update(rng.sample(by_load, min(config.random, len(by_load))))
    return chosen
