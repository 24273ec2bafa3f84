"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running decodes go first (one token each), then prompts already
being prefilled, then new prompts; a prompt longer than what is left of the budget is cut into
chunks, so a long prompt shares steps with running decodes instead of stalling them. When a
decode needs a block and none is free, the most recently arrived running sequence is preempted:
its blocks are freed and it is recomputed later (its prefix is usually still cached).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from common.engine.sequence import SeqStatus, Sequence
from common.kv.block_manager import BlockManager


@dataclass
class ScheduledBatch:
    seqs: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds computed blocks (imported KV)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        decodes = [s for s in self.running if s.is_decoding]
        prefills = [s for s in self.running if not s.is_decoding]
        for seq in decodes:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted to make room for an earlier arrival
            if not self._reserve_append(seq, batch):
                continue
            if seq.first_scheduled_time is None:  # imported KV: its first decode step is its admission
                seq.first_scheduled_time = time.monotonic()
            batch.seqs.append((seq, 1))
            budget -= 1
        for seq in prefills:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted above
            n = min(seq.num_uncomputed, budget)
            batch.seqs.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            batch.seqs.append((seq, n))
            budget -= n
        return batch

    def _reserve_append(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Make room for seq's next token, preempting later arrivals. False if seq itself was preempted."""
        while not self.blocks.can_append(seq):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim, batch)
            if victim is seq:
                return False
        self.blocks.append_slots(seq)
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        batch.seqs = [(s, n) for s, n in batch.seqs if s is not seq]
