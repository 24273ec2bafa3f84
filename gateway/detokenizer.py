"""Incremental text for streaming: emit only what is final.

A multi-byte character split across tokens decodes as U+FFFD until its last byte arrives, and text
that could be the start of a stop string must wait until we know it is not; both are held back.

Each push decodes only the new tokens plus a few before them (byte-level BPE needs the neighbours
to place spaces and join bytes), not the whole output: the cost of a token does not grow with the
length of the stream. Stop strings are searched only where a new one could start.
"""

from __future__ import annotations

from common.tokenizer import Tokenizer

_CONTEXT_TOKENS = 4


class StreamDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.stop = stop
        self.text = ""  # the decoded text of ids[: self.done], which ends on a whole character
        self.done = 0
        self._searched = 0  # no stop string starts before this index of self.text

    def _decode_new(self) -> str | None:
        """The text with every token so far, or None while it ends in a partial character."""
        anchor = max(0, self.done - _CONTEXT_TOKENS)
        before = self.tokenizer.decode(self.ids[anchor : self.done])
        after = self.tokenizer.decode(self.ids[anchor:])
        if after.endswith("\ufffd"):
            return None
        if not after.startswith(before):  # the new tokens changed how the context decodes: redo it all
            return self.tokenizer.decode(self.ids)
        return self.text + after[len(before) :]

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self._decode_new()
        if text is None:
            return ""
        self.text, self.done = text, len(self.ids)
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
        start = max(0, min(self._searched, len(text)) - self.holdback)
        cut = min((i for s in self.stop if (i := text.find(s, start)) >= 0), default=len(text))
        if cut == len(text):
            self._searched = len(text)
        return cut
