"""Pins of prefilled KV, readable and releasable from any thread.

A prefill-only request's blocks stay pinned until the decode side releases them or the lease
expires. The pull, the release and the lease bookkeeping come from gRPC handlers, and must never
wait behind a long engine step (a release that timed out behind a 3 s prefill step used to fail a
pull that had succeeded). So the table answers under its own lock, at once; only the freeing of
the blocks (the block manager is not thread-safe) waits for the engine thread, which settles
released and expired leases between steps.

Whether a lease ended by release or by expiry is decided once, under the lock: a release after
the deadline answers False (the blocks may already be reused, so what was read may be stale),
and an expired lease is never released.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from common.errors import UnknownRequestError


@dataclass
class Lease:
    block_ids: tuple[int, ...]
    num_tokens: int
    deadline: float  # time.monotonic()
    ended: str = ""  # "" while live; "released" | "expired"


class LeaseTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self.expired = 0  # leases that ran out before a release (a pull that never came, or came late)

    def pin(self, request_id: str, block_ids: list[int], num_tokens: int, deadline: float) -> None:
        with self._lock:
            self._leases[request_id] = Lease(tuple(block_ids), num_tokens, deadline)

    def live(self, request_id: str, extend_s: float | None = None) -> Lease:
        """The live lease (pushed out to now + extend_s when given); raises if it ended."""
        with self._lock:
            now = time.monotonic()
            lease = self._live(request_id, now)
            if extend_s is not None:
                lease.deadline = now + extend_s
            return Lease(lease.block_ids, lease.num_tokens, lease.deadline)

    def release(self, request_id: str) -> bool:
        """End a live lease: True if it was live, False if unknown, released or expired."""
        with self._lock:
            try:
                self._live(request_id, time.monotonic()).ended = "released"
            except UnknownRequestError:
                return False
            return True

    def settle(self, now: float | None = None) -> list[str]:
        """Engine thread: the leases that ended (released, or expired as of `now`); forgets them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            done = []
            for rid, lease in self._leases.items():
                if not lease.ended and lease.deadline <= now:
                    lease.ended = "expired"
                    self.expired += 1
                if lease.ended:
                    done.append(rid)
            for rid in done:
                del self._leases[rid]
            return done

    def drop(self, request_id: str) -> None:
        """The request was aborted some other way: its lease is gone with it."""
        with self._lock:
            self._leases.pop(request_id, None)

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((lease.deadline for lease in self._leases.values() if not lease.ended), default=None)

    def _live(self, request_id: str, now: float) -> Lease:
        lease = self._leases.get(request_id)
        if lease is not None and not lease.ended and lease.deadline <= now:
            lease.ended = "expired"
            self.expired += 1
        if lease is None or lease.ended:
            raise UnknownRequestError(f"no pinned KV for request {request_id!r} (released or lease expired)")
        return lease
