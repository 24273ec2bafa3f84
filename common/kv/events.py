"""KV block events: what a worker's prefix cache gained or lost, in order, with sequence numbers.

The router rebuilds each worker's set of cached block hashes from these; a gap in sequence numbers
tells it to resync from a snapshot.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class KVEvent:
    seq: int
    kind: Literal["stored", "removed", "cleared"]
    block_hash: int
    parent_hash: int = 0


class KVEventLog:
    """A bounded in-memory log; consumers ask for everything after the last seq they saw."""

    def __init__(self, capacity: int = 65536) -> None:
        self._events: deque[KVEvent] = deque(maxlen=capacity)
        self._next_seq = 1
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def append(self, kind: Literal["stored", "removed", "cleared"], block_hash: int, parent_hash: int = 0) -> None:
        with self._cond:
            self._events.append(KVEvent(self._next_seq, kind, block_hash, parent_hash))
            self._next_seq += 1
            self._cond.notify_all()

    def since(self, after_seq: int) -> list[KVEvent]:
        """Events with seq > after_seq still held (the caller detects a gap by the first seq)."""
        with self._lock:
            return [e for e in self._events if e.seq > after_seq]

    def wait(self, after_seq: int, timeout: float) -> bool:
        """Block until an event newer than after_seq exists, or timeout. True if one exists."""
        with self._cond:
            return self._cond.wait_for(lambda: self.last_seq > after_seq, timeout)
