"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from common.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not yet holding blocks (new, or preempted)
    RUNNING = "running"  # holds blocks; prefilling or decoding
    EXPORTED = "exported"  # prefill-only request done; blocks leased to a puller until released or expired
    IMPORTING = "importing"  # blocks reserved for K/V arriving from another worker; not yet scheduled
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prefill_only: bool = False
    arrival: float = field(default_factory=time.monotonic)

    status: SeqStatus = SeqStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at (first) admission
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of leading full blocks
    num_preemptions: int = 0
    finish_reason: str | None = None
    first_scheduled_time: float | None = None  # left the waiting queue (first admission)
    first_token_time: float | None = None
    output_text: str = ""  # detokenized output, maintained when stop strings are set

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is left to compute."""
        return self.num_uncomputed == 1 and bool(self.output_token_ids)
