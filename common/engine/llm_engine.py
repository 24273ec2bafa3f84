"""The engine: requests in, tokens out, one `step()` at a time. Not thread-safe: one owner thread
(see async_engine) calls every method, except `stats` and the handoff's lease methods
(`handoff.export`, `extend`, `release`), which any thread may call so that a long step never
delays them. KV moving to or from another worker goes through `handoff` (common/engine/handoff.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

from common.config import EngineConfig
from common.engine.handoff import KVHandoff
from common.engine.model_runner import ModelRunner
from common.engine.outputs import RequestOutput
from common.engine.sampling import SamplingParams
from common.engine.scheduler import Scheduler
from common.engine.sequence import SeqStatus, Sequence
from common.errors import InvalidRequestError
from common.kv.block_manager import BlockManager
from common.kv.cache import KVCache
from common.kv.events import KVEventLog
from common.kv.layout import KVLayout
from common.model.llama import LlamaForCausalLM
from common.tokenizer import Tokenizer


class LLMEngine:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: EngineConfig,
        model_id: str,
        tokenizer: Tokenizer | None = None,
        events: KVEventLog | None = None,
        weights_digest: str = "",
    ) -> None:
        """`events`: the log to report cache changes to; a worker serving several models shares one,
        so gateways follow one stream per worker (the models' block hashes never collide: each
        model's chains start from a root of its id)."""
        cfg = model.config
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or min(cfg.max_position, 8192)
        if self.max_model_len > cfg.max_position:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's {cfg.max_position}")
        self.layout = KVLayout(
            model_id=model_id,
            dtype=config.resolved_dtype(),
            block_size=config.block_size,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            weights=weights_digest,
        )
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_mb * 2**20 // self.layout.block_bytes)
        self.cache = KVCache(self.layout, num_blocks, config.device)
        self.events = events if events is not None else KVEventLog()
        self.blocks = BlockManager(num_blocks, config.block_size, self.events, namespace=model_id)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.cache, config.device)
        eos = set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self.eos_token_ids = frozenset(eos)
        self.seqs: dict[str, Sequence] = {}  # every request holding engine state
        self.handoff = KVHandoff(self, config.lease_seconds)  # KV to and from other workers
        self.num_steps = 0
        self.num_aborts = 0  # requests stopped from outside (client gone, failed pull, drain)

    # -- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        self.validate(request_id, prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params, prefill_only=prefill_only)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks at once. False if unknown."""
        dropped = self.drop(request_id)
        self.num_aborts += dropped
        return dropped

    def drop(self, request_id: str) -> bool:
        """Forget a request and free its blocks (no abort counted)."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self._free(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.num_steps += 1
        sampled = self.runner.run(batch.seqs)
        outputs = []
        for seq, n in batch.seqs:
            seq.num_computed_tokens += n
            self.blocks.commit(seq)
            token = sampled.get(seq.request_id)
            if token is not None:
                outputs.append(self._append_token(seq, token))
        return outputs

    def fail(self, request_ids: Seq[str], message: str) -> list[RequestOutput]:
        """Finish these requests with an error (the loop calls this when a step raised)."""
        outs = []
        for rid in request_ids:
            seq = self.seqs.get(rid)
            if seq is not None:
                self.drop(rid)
                outs.append(RequestOutput(rid, finished=True, finish_reason="error", error=message))
        return outs

    def finish_import(self, request_id: str) -> RequestOutput | None:
        """Imported blocks are filled (see `handoff.begin_import`): join the running batch, or end
        at once if the imported first token already ends the request."""
        return self.handoff.finish_import(request_id, self._join_imported)

    def _join_imported(self, seq: Sequence) -> RequestOutput | None:
        reason = self._stop_reason(seq, seq.output_token_ids[-1])
        if reason is not None:
            return self._finish(seq, reason, [seq.output_token_ids[-1]])
        self.scheduler.add_running(seq)
        return None

    # -- stats ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters, safe to read from any thread: each is one atomic read under the GIL (the
        sequences are copied in one step before counting), so a long step never delays them."""
        seqs = list(self.seqs.values())
        handoff = self.handoff.counts()
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "pinned": handoff["exported"] + handoff["importing"],  # held outside the batch
            "sequences": len(seqs),  # everything holding engine state, imports included
            "free_blocks": self.blocks.num_free_blocks,
            "total_blocks": self.blocks.num_blocks,
            "cached_blocks": self.blocks.num_cached_blocks,
            "prefix_query_tokens": self.blocks.prefix_queries,
            "prefix_hit_tokens": self.blocks.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
            "aborts": self.num_aborts,
            "lease_expiries": handoff["lease_expiries"],
        }

    # -- internals ------------------------------------------------------------------------------
    def validate(self, request_id: str, prompt: Seq[int], params: SamplingParams) -> None:
        """Every field of a request that could fail a step, checked before it joins a batch."""
        if request_id in self.seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if not prompt:
            raise InvalidRequestError("the prompt is empty; give at least one token", "prompt")
        params.validate()
        vocab = self.runner.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if params.logit_bias and (top := max(t for t, _ in params.logit_bias)) >= vocab:
            raise InvalidRequestError(
                f"logit_bias token id {top} is outside this model's vocabulary [0, {vocab})", "logit_bias"
            )
        if not 0 <= params.prior_output_tokens < len(prompt):
            raise InvalidRequestError(
                f"prior_output_tokens must be in [0, {len(prompt)}), got {params.prior_output_tokens}",
                "prior_output_tokens",
            )
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens; this model's context window is {self.max_model_len} "
                "and at least one must be left to generate",
                "prompt",
            )
        if self.blocks.blocks_for(len(prompt) + params.max_tokens) > self.blocks.num_blocks:
            limit = self.blocks.num_blocks * self.blocks.block_size - len(prompt)
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceed the KV cache "
                f"({self.blocks.num_blocks * self.blocks.block_size} tokens); use max_tokens <= {limit}",
                "max_tokens",
            )

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        seq.output_token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        reason = self._stop_reason(seq, token)
        if reason is not None:
            return self._finish(seq, reason, [token])
        if seq.prefill_only:
            self.handoff.pin(seq)
            return self._output(seq, [token], pinned=True)
        return self._output(seq, [token])

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids)
            cut = min((i for s in p.stop if (i := text.find(s)) >= 0), default=-1)
            seq.output_text = text if cut < 0 else text[:cut]
            if cut >= 0:
                return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, new_tokens: list[int]) -> RequestOutput:
        seq.finish_reason = reason
        self.drop(seq.request_id)
        seq.status = SeqStatus.FINISHED
        return self._output(seq, new_tokens)

    def _output(self, seq: Sequence, new_tokens: list[int], pinned: bool = False) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            new_tokens,
            finished=seq.status is SeqStatus.FINISHED,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=len(seq.output_token_ids),
            pinned=pinned,
            text=seq.output_text if seq.params.stop else None,
            queue_seconds=_since(seq.arrival, seq.first_scheduled_time),
            prefill_seconds=_since(seq.first_scheduled_time, seq.first_token_time),
            admitted_at=seq.first_scheduled_time,
            first_token_at=seq.first_token_time,
        )

    def _free(self, seq: Sequence) -> None:
        self.handoff.leases.drop(seq.request_id)
        if seq.block_table:
            self.blocks.free(seq)
        self.runner.sampler.forget(seq.request_id)


def _since(start: float | None, end: float | None) -> float | None:
    return end - start if start is not None and end is not None else None
