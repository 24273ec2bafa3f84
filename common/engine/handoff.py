"""The engine's P/D port: KV leaving this worker (a prefilled request's blocks, leased until the
decode side has pulled them) and KV arriving (blocks reserved for a prompt another worker
prefilled, joined to the batch once filled).

A request in the handoff is in one of two states of its own, never scheduled while in either:
`EXPORTED` (its blocks leased to a puller) or `IMPORTING` (blocks reserved, awaiting their bytes).
Lease bookkeeping (`export`, `extend`, `release`) is safe from any thread (common/engine/leases.py);
everything else runs on the engine thread. A cache too full to take an import raises
`CacheFullError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from common.engine.leases import LeaseTable
from common.engine.outputs import KVExport, RequestOutput
from common.engine.sampling import SamplingParams
from common.engine.sequence import SeqStatus, Sequence
from common.errors import CacheFullError, InvalidRequestError, UnknownRequestError

if TYPE_CHECKING:
    from common.engine.llm_engine import LLMEngine


class KVHandoff:
    def __init__(self, engine: LLMEngine, lease_seconds: float) -> None:
        self._engine = engine
        self.lease_seconds = lease_seconds
        self.leases = LeaseTable()

    # -- export (prefill side) ------------------------------------------------------------------
    def pin(self, seq: Sequence) -> None:
        """Engine thread: a prefill-only request has its first token; lease its blocks out."""
        self._engine.scheduler.remove(seq)
        seq.status = SeqStatus.EXPORTED
        deadline = time.monotonic() + self.lease_seconds
        self.leases.pin(seq.request_id, seq.block_table, len(seq.prompt_token_ids), deadline)

    def export(self, request_id: str) -> KVExport:
        """Any thread: the live lease of a request, as a handle's contents."""
        return self._as_export(request_id, self.leases.live(request_id))

    def extend(self, request_id: str) -> KVExport:
        """Any thread: a pull is starting; keep the blocks leased for another full lease."""
        return self._as_export(request_id, self.leases.live(request_id, extend_s=self.lease_seconds))

    def release(self, request_id: str) -> bool:
        """Any thread: the decode side has the blocks. False if unknown, released or expired; the
        blocks are freed by the engine thread's next `settle`."""
        return self.leases.release(request_id)

    def settle(self, now: float | None = None) -> list[str]:
        """Engine thread: free the blocks of leases that were released or have expired."""
        ended = self.leases.settle(now)
        for rid in ended:
            self._engine.drop(rid)
        return ended

    def next_deadline(self) -> float | None:
        return self.leases.next_deadline()

    def _as_export(self, request_id: str, lease) -> KVExport:  # noqa: ANN001 - a leases.Lease
        return KVExport(request_id, list(lease.block_ids), lease.num_tokens, self._engine.layout, lease.deadline)

    # -- import (decode side) -------------------------------------------------------------------
    def begin_import(
        self, request_id: str, prompt_token_ids: Seq[int], first_token: int, params: SamplingParams
    ) -> list[int]:
        """Reserve blocks for a prompt whose K/V arrive from another worker; returns the block ids
        to fill. Then `finish_import` (or the engine's `abort`)."""
        engine = self._engine
        engine.validate(request_id, prompt_token_ids, params)
        vocab = engine.runner.model.config.vocab_size
        if not 0 <= first_token < vocab:  # would fail the step, and every request batched with it
            raise InvalidRequestError(
                f"first_token {first_token} is outside the vocabulary [0, {vocab})", "first_token"
            )
        blocks = engine.blocks
        need = blocks.blocks_for(len(prompt_token_ids))
        if need > blocks.num_free_blocks:
            raise CacheFullError(
                f"not enough free KV blocks to import {len(prompt_token_ids)} tokens ({blocks.num_free_blocks} free)"
            )
        seq = Sequence(request_id, list(prompt_token_ids), params)
        seq.block_table = blocks.allocate_blocks(need)
        seq.output_token_ids = [first_token]
        seq.status = SeqStatus.IMPORTING
        engine.seqs[request_id] = seq
        return list(seq.block_table)

    def finish_import(
        self, request_id: str, finish: Callable[[Sequence], RequestOutput | None]
    ) -> RequestOutput | None:
        """The imported blocks are filled: register their hashes and let `finish` end the request
        (its first token may already end it) or join it to the running batch."""
        seq = self._engine.seqs.get(request_id)
        if seq is None or seq.status is not SeqStatus.IMPORTING:
            raise UnknownRequestError(f"no import in progress for request {request_id!r}")
        seq.num_computed_tokens = len(seq.prompt_token_ids)
        seq.first_token_time = time.monotonic()
        self._engine.blocks.commit(seq)
        return finish(seq)

    # -- counters -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        seqs = list(self._engine.seqs.values())
        exported = sum(s.status is SeqStatus.EXPORTED for s in seqs)
        importing = sum(s.status is SeqStatus.IMPORTING for s in seqs)
        return {"exported": exported, "importing": importing, "lease_expiries": self.leases.expired}
