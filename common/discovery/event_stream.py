"""A worker's KV block events on a Redis Stream, so any number of gateways follow them without
each holding a stream open to every worker.

One stream entry carries a run of consecutive events: `first` (seq of the first), `kinds` (one
byte per event: s=stored, r=removed, c=cleared) and `hashes` (little-endian uint64 per event).
Readers detect a gap by sequence number (a trimmed stream, a lagging publisher) and resync from
the worker's snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.kv.events import KVEvent, KVEventLog

log = logging.getLogger(__name__)

_KIND_CODE = {"stored": b"s", "removed": b"r", "cleared": b"c"}
_CODE_KIND = {v[0]: k for k, v in _KIND_CODE.items()}
MAX_EVENTS_PER_ENTRY = 4096
STREAM_MAXLEN = 20_000  # entries; trimming is approximate, readers that fall behind resync


def encode_entry(events: Sequence[KVEvent]) -> dict[bytes, bytes]:
    return {
        b"first": str(events[0].seq).encode(),
        b"kinds": b"".join(_KIND_CODE[e.kind] for e in events),
        b"hashes": struct.pack(f"<{len(events)}Q", *(e.block_hash for e in events)),
    }


def decode_entry(fields: Mapping[bytes, bytes]) -> list[KVEvent]:
    """Raises ValueError on a malformed entry."""
    try:
        first = int(fields[b"first"])
        kinds = fields[b"kinds"]
        hashes = struct.unpack(f"<{len(kinds)}Q", fields[b"hashes"])
        return [KVEvent(first + i, _CODE_KIND[k], h) for i, (k, h) in enumerate(zip(kinds, hashes, strict=True))]
    except (KeyError, ValueError, struct.error) as e:
        raise ValueError(f"malformed KV event entry: {e}") from e


class EventPublisher:
    """Copies the engine's event log onto the stream, in order, batching what accumulated."""

    def __init__(self, client: aioredis.Redis, log_: KVEventLog, stream: str, ttl_ms: int) -> None:
        self.client = client
        self.log = log_
        self.stream = stream
        self.ttl_ms = ttl_ms
        self.published_seq = 0

    async def run(self) -> None:
        while True:
            events = self.log.since(self.published_seq)[:MAX_EVENTS_PER_ENTRY]
            if not events:
                await asyncio.to_thread(self.log.wait, self.published_seq, 0.5)
                continue
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.xadd(self.stream, encode_entry(events), maxlen=STREAM_MAXLEN, approximate=True)
                    pipe.pexpire(self.stream, self.ttl_ms)
                    await pipe.execute()
            except (RedisError, OSError) as e:
                # Readers will see the hole as a gap and resync; retry the same events meanwhile.
                log.warning("publishing KV events failed (will retry): %s", e)
                await asyncio.sleep(1.0)
                continue
            self.published_seq = events[-1].seq
