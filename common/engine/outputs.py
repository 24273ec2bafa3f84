"""What the engine reports about a request after each step, and what it exports for KV transfer."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.kv.layout import KVLayout


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    num_output_tokens: int = 0
    pinned: bool = False  # prefill-only: KV blocks are held for a pull (see KVExport)
    text: str | None = None  # output text so far, cut at a stop string (set when stop strings are used)
    error: str | None = None
    queue_seconds: float | None = None  # arrival to first admission
    prefill_seconds: float | None = None  # first admission to first token
    # The same moments as time.monotonic() (one clock for the whole process), so a service can split
    # its own span into phases that add up: arrival -> admitted_at -> first_token_at -> its reply.
    admitted_at: float | None = None
    first_token_at: float | None = None


@dataclass(frozen=True)
class KVExport:
    """Where a pinned request's K/V live: the transfer layer reads exactly these blocks."""

    request_id: str
    block_ids: list[int]
    num_tokens: int  # tokens whose K/V are in the blocks (the prompt)
    layout: KVLayout
    lease_deadline: float  # time.monotonic() on the exporting host
