"""Which block hashes each worker holds, rebuilt from the workers' own KV events.

Events carry sequence numbers; a gap (a lost or skipped event) marks the worker's view stale until
a snapshot replaces it, so a drifting index never silently misroutes for long.

Each (worker, block) pair is kept twice: in the worker's view (what `match` reads) and in a map
from block hash to its holders, so that a large pool's best prefix holders are found from the
prompt's blocks without visiting every worker (`holders_by_match`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class _WorkerView:
    hashes: set[int] = field(default_factory=set)
    last_seq: int = 0
    stale: bool = True  # until the first snapshot


class PrefixIndex:
    def __init__(self) -> None:
        self._views: dict[str, _WorkerView] = {}
        self._holders: dict[int, set[str]] = {}

    def snapshot(self, worker_id: str, hashes: Iterable[int], last_seq: int) -> None:
        self._drop_holdings(worker_id)
        view = self._views[worker_id] = _WorkerView(set(hashes), last_seq, stale=False)
        for h in view.hashes:
            self._holders.setdefault(h, set()).add(worker_id)

    def apply(self, worker_id: str, seq: int, kind: str, block_hash: int) -> bool:
        """Apply one event. False if it reveals a gap: the caller must resync with a snapshot."""
        view = self._views.setdefault(worker_id, _WorkerView())
        if view.stale:
            return False
        if seq <= view.last_seq:
            return True  # already applied (a replay after reconnect)
        if seq != view.last_seq + 1:
            view.stale = True
            self._drop_holdings(worker_id)  # a stale view matches nothing until its snapshot
            return False
        view.last_seq = seq
        if kind == "stored":
            view.hashes.add(block_hash)
            self._holders.setdefault(block_hash, set()).add(worker_id)
        elif kind == "removed":
            view.hashes.discard(block_hash)
            self._unhold(block_hash, worker_id)
        return True

    def _unhold(self, block_hash: int, worker_id: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[block_hash]

    def _drop_holdings(self, worker_id: str) -> None:
        old = self._views.get(worker_id)
        if old is not None:
            for h in old.hashes:
                self._unhold(h, worker_id)

    def needs_snapshot(self, worker_id: str) -> bool:
        view = self._views.get(worker_id)
        return view is None or view.stale

    def last_seq(self, worker_id: str) -> int:
        view = self._views.get(worker_id)
        return view.last_seq if view else 0

    def forget(self, worker_id: str) -> None:
        self._drop_holdings(worker_id)
        self._views.pop(worker_id, None)

    def match(self, worker_id: str, block_hashes: Sequence[int]) -> int:
        """Number of leading prompt blocks the worker holds (chained hashes: a prefix, never a gap)."""
        view = self._views.get(worker_id)
        if view is None or view.stale:
            return 0
        n = 0
        for h in block_hashes:
            if h not in view.hashes:
                break
            n += 1
        return n

    def holders_by_match(self, block_hashes: Sequence[int], limit: int) -> list[tuple[str, int]]:
        """Up to `limit` workers holding the longest prefix of these blocks, longest first, as
        (worker id, blocks). Block hashes are chained, so holding block d means having computed the
        whole prefix up to d: walking back from the prompt's last block, the first holders found
        are the longest matches, and the walk stops as soon as `limit` are known. A worker that
        evicted a parent but kept the child would be ranked by the child; the scorers then read
        its exact match (`match`)."""
        found: dict[str, int] = {}
        for depth in range(len(block_hashes), 0, -1):
            holders = self._holders.get(block_hashes[depth - 1])
            if not holders:
                continue
            new = [w for w in holders if w not in found] if found else holders
            for w in heapq.nsmallest(limit - len(found), new):
                found[w] = depth
            if len(found) >= limit:
                break
        return list(found.items())
