"""Which block hashes each worker holds, rebuilt from the workers' own KV events.

Events carry sequence numbers; a gap (a lost or skipped event) marks the worker's view stale until
a snapshot replaces it, so a drifting index never silently misroutes for long.
"""

from __future__ import annotations

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

    def snapshot(self, worker_id: str, hashes: Iterable[int], last_seq: int) -> None:
        self._views[worker_id] = _WorkerView(set(hashes), last_seq, stale=False)

    def apply(self, worker_id: str, seq: int, kind: str, block_hash: int) -> bool:
        """Apply one event. False if it reveals a gap: the caller must resync with a snapshot."""
        view = self._views.setdefault(worker_id, _WorkerView())
        if view.stale:
            return False
        if seq <= view.last_seq:
            return True  # already applied (a replay after reconnect)
        if seq != view.last_seq + 1:
            view.stale = True
            return False
        view.last_seq = seq
        if kind == "stored":
            view.hashes.add(block_hash)
        elif kind == "removed":
            view.hashes.discard(block_hash)
        return True

    def needs_snapshot(self, worker_id: str) -> bool:
        view = self._views.get(worker_id)
        return view is None or view.stale

    def last_seq(self, worker_id: str) -> int:
        view = self._views.get(worker_id)
        return view.last_seq if view else 0

    def forget(self, worker_id: str) -> None:
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
