"""What the scheduler sees of a worker and of a request. Small, immutable, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    address: str
    role: str
    healthy: bool = True
    draining: bool = False
    layout_ok: bool = True
    waiting: int = 0
    running: int = 0
    free_blocks: int = 1
    total_blocks: int = 1
    inflight_tokens: int = 0  # prompt tokens this gateway has sent and not yet seen finish
    pending_blocks: int = 0  # KV blocks this gateway promised that the worker's Stats do not show yet
    streams: int = 0  # requests decoding (or about to) on this worker, as far as this gateway knows
    stream_limit: int = 0  # most streams a decode worker may be given; 0: no limit
    serves_model: bool = True  # the request's model is one this worker serves
    model_loaded: bool = True  # ...and has loaded (else the first request waits for a load)
    in_pool: bool = True  # the worker is in the pool the request's workload class is kept to (if any)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / max(1, self.total_blocks)

    @property
    def load(self) -> int:
        """Requests queued or running: the imbalance guard's measure."""
        return self.waiting + self.running


@dataclass(frozen=True)
class Placement:
    """Where a request may run: its model ("": the gateway's first) and the worker pool its workload
    class is kept to ("": any)."""

    model: str = ""
    pool: str = ""


ANYWHERE = Placement()


@dataclass(frozen=True)
class RequestInfo:
    prompt_tokens: int
    block_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full blocks
    block_size: int = 16

    @property
    def blocks_needed(self) -> int:
        """KV blocks for the prompt and the first generated token."""
        return -(-(self.prompt_tokens + 1) // max(1, self.block_size))


@dataclass
class ScoredCandidate:
    candidate: Candidate
    scores: dict[str, float] = field(default_factory=dict)
    total: float = 0.0


class Filter(Protocol):
    type_name: str

    def keep(self, c: Candidate, req: RequestInfo) -> bool: ...


class Scorer(Protocol):
    type_name: str

    def score(self, candidates: list[Candidate], req: RequestInfo) -> list[float]:
        """One score in [0, 1] per candidate (higher is better)."""
        ...
