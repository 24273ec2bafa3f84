"""What this gateway has sent to each worker and not yet seen finish: prompt tokens (a load
signal for the scorers) and, on decode workers, KV blocks that the worker's last Stats may not
show yet (the scheduler's KV-fit view).

A decode worker's free-block count is polled; between polls the gateway must not count on blocks
it has already promised to another request. A request's blocks count as pending on its decode
worker until the worker has reserved them (its decode stream produced a chunk) and a Stats poll
taken after that moment has been seen.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Charge:
    workers: tuple[str, ...]
    tokens: int
    decode_worker: str
    decode_blocks: int
    reserved_at: float | None = None  # when the decode worker had reserved the blocks


@dataclass
class InflightLedger:
    tokens: Counter[str] = field(default_factory=Counter)
    _open: dict[int, Charge] = field(default_factory=dict)

    def charge(self, workers: tuple[str, ...], tokens: int, decode_worker: str, decode_blocks: int) -> Charge:
        c = Charge(workers, tokens, decode_worker, decode_blocks)
        for w in workers:
            self.tokens[w] += tokens
        self._open[id(c)] = c
        return c

    def reserved(self, c: Charge) -> None:
        if c.reserved_at is None:
            c.reserved_at = time.time()

    def settle(self, c: Charge) -> None:
        if self._open.pop(id(c), None) is None:
            return
        for w in c.workers:
            self.tokens[w] -= c.tokens
            if self.tokens[w] <= 0:
                del self.tokens[w]

    def streams(self, decode_worker: str) -> int:
        return sum(c.decode_worker == decode_worker for c in self._open.values())

    def pending_blocks(self, decode_worker: str, stats_seen_at: float) -> int:
        """Blocks promised on this worker that its Stats (taken at `stats_seen_at`) do not show."""
        return sum(
            c.decode_blocks
            for c in self._open.values()
            if c.decode_worker == decode_worker and (c.reserved_at is None or c.reserved_at > stats_seen_at)
        )
