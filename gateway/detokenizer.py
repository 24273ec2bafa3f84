"""Incremental text for streaming: emit only what is final.

A multi-byte character split across tokens decodes as U+FFFD until its last byte arrives, and text
that could be the start of a stop string must wait until we know it is not; both are held back.
"""

from __future__ import annotations

from common.tokenizer import Tokenizer


class StreamDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.stop = stop

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        end = len(text)
        if self.stop:
            cut = self._cut(text)
            end = cut if cut < len(text) else len(text) - self.holdback
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent : end], end
        return delta

    def finish(self, final_text: str | None) -> str:
        """The rest, cut at a stop string. final_text: the worker's authoritative text, if it sent one."""
        if final_text is None:
            text = self.tokenizer.decode(self.ids)
            text = text[: self._cut(text)]
        else:
            text = final_text
        delta = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return delta

    def _cut(self, text: str) -> int:
        """Index of the first stop string in text, or len(text)."""
        return min((i for s in self.stop if (i := text.find(s)) >= 0), default=len(text))
