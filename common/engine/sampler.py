"""Token selection: greedy for temperature 0, otherwise temperature, top-k and top-p with an
optional per-request seed (a seeded request draws from its own generator, so its tokens do not
depend on what else is in the batch). Penalties and logit_bias (see penalties.py) change a
request's logits first, under greedy sampling too; a batch in which no request asks for them
takes the plain argmax path untouched."""

from __future__ import annotations

import torch

from common.engine.penalties import Penalizer
from common.engine.sampling import SamplingParams
from common.engine.sequence import Sequence


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._penalizer = Penalizer()

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._penalizer.forget(request_id)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits: [B, vocab] float32, one row per sequence (whose next token it scores); not modified.
        Returns one token id per row."""
        if any(s.params.adjusts_logits for s in seqs):
            logits = logits.clone()
            for i, s in enumerate(seqs):
                if s.params.adjusts_logits:
                    self._penalizer.apply(logits[i], s)
        out = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(seqs):
            if not s.params.greedy:
                out[i] = self._draw(logits[i], s.request_id, s.params)
        return out

    def _draw(self, logits: torch.Tensor, request_id: str, params: SamplingParams) -> int:
        logits = logits / params.temperature
        if params.top_k and params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cum = sorted_probs.cumsum(0)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = cum - sorted_probs >= params.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        gen = None
        if params.seed is not None:
            gen = self._generators.get(request_id)
            if gen is None:
                gen = self._generators[request_id] = torch.Generator().manual_seed(params.seed)
        return int(torch.multinomial(probs, 1, generator=gen).item())
