"""The requests being served and when each last received a token, so that a stream that started
but went quiet shows on the dashboard (and pages) before anyone complains:
`kvrelay_gateway_stream_max_token_gap_seconds` is the longest current gap, read at scrape time."""

from __future__ import annotations

import itertools
import time


class TokenGaps:
    def __init__(self) -> None:
        self._last: dict[int, float] = {}
        self._ids = itertools.count()

    def open(self) -> int:
        key = next(self._ids)
        self._last[key] = time.monotonic()
        return key

    def tick(self, key: int) -> None:
        self._last[key] = time.monotonic()

    def close(self, key: int) -> None:
        self._last.pop(key, None)

    def max_gap(self) -> float:
        if not self._last:
            return 0.0
        return max(0.0, time.monotonic() - min(self._last.values()))
