"""The logit changes a request asks for before a token is picked, with vLLM's meaning:

- repetition_penalty (> 0, 1 is off) over every token of the prompt and the output so far: a positive
  logit is divided by it, a negative one multiplied (so > 1 always makes a seen token less likely);
- frequency_penalty and presence_penalty ([-2, 2], 0 is off) over the output so far: the logit drops by
  frequency_penalty per occurrence, and by presence_penalty once if the token occurred at all;
- logit_bias last (token id -> bias added to its logit), so a bias is exactly what the client asked for.

They apply under greedy sampling too: they change which token is the argmax. What each request has
seen is kept between steps and updated with only the tokens added since, so a step costs O(vocab)
for the vector update, not O(sequence length) of Python work."""

from __future__ import annotations

import torch

from common.engine.sampling import SamplingParams
from common.engine.sequence import Sequence


class _Seen:
    """Which tokens one request's prompt and output hold, and how often each occurs in the output."""

    def __init__(self, vocab: int, device: torch.device, counts: bool) -> None:
        self.in_context = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(vocab, dtype=torch.float32, device=device) if counts else None
        self.prompt_len = 0
        self.output_len = 0

    def catch_up(self, seq: Sequence) -> None:
        new_prompt = seq.prompt_token_ids[self.prompt_len :]
        new_output = seq.output_token_ids[self.output_len :]
        if new_prompt or new_output:
            device = self.in_context.device
            ids = torch.tensor(new_prompt + new_output, dtype=torch.long, device=device)
            self.in_context[ids] = True
            # Output so far: the prompt's tail that was generated before a migration, then our own.
            first_output = len(seq.prompt_token_ids) - seq.params.prior_output_tokens
            skip = max(0, first_output - self.prompt_len)
            if self.output_counts is not None and len(ids) > skip:
                out = ids[skip:]
                self.output_counts.index_put_((out,), torch.ones_like(out, dtype=torch.float32), accumulate=True)
        self.prompt_len, self.output_len = len(seq.prompt_token_ids), len(seq.output_token_ids)


class Penalizer:
    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._bias: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # built once: a bias may cover the vocab

    def forget(self, request_id: str) -> None:
        self._seen.pop(request_id, None)
        self._bias.pop(request_id, None)

    def apply(self, row: torch.Tensor, seq: Sequence) -> None:
        """Change `row` ([vocab] logits of `seq`'s next token) in place."""
        p: SamplingParams = seq.params
        if p.repetition_penalty != 1.0 or p.needs_output_counts:
            seen = self._seen_of(seq, row)
            if p.repetition_penalty != 1.0:
                scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where(seen.in_context, scaled, row))
            if p.needs_output_counts and seen.output_counts is not None:
                counts = seen.output_counts
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(counts.dtype)
        if p.logit_bias:
            bias = self._bias.get(seq.request_id)
            if bias is None:
                ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=row.device)
                values = torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=row.device)
                bias = self._bias[seq.request_id] = (ids, values)
            row[bias[0]] += bias[1]

    def _seen_of(self, seq: Sequence, row: torch.Tensor) -> _Seen:
        seen = self._seen.get(seq.request_id)
        stale = seen is not None and (
            len(seq.prompt_token_ids) < seen.prompt_len or len(seq.output_token_ids) < seen.output_len
        )
        if seen is None or stale:
            seen = self._seen[seq.request_id] = _Seen(row.numel(), row.device, seq.params.needs_output_counts)
        seen.catch_up(seq)
        return seen
