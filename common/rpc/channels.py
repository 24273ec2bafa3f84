"""Shared gRPC channel options and a per-address channel cache (one HTTP/2 connection per peer)."""

from __future__ import annotations

import grpc

from common.rpc.tls import TLSSettings

# KV chunks are a few MB; leave room above gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 64 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


class ChannelPool:
    def __init__(self, tls: TLSSettings | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tls = tls if tls is not None and tls.enabled else None
        self._credentials = self._tls.channel_credentials() if self._tls else None

    def get(self, address: str, lane: int = 0) -> grpc.aio.Channel:
        """The channel to `address`; distinct lanes are distinct connections (for parallel bulk streams)."""
        key = f"{address}#{lane}"
        ch = self._channels.get(key)
        if ch is None:
            # a private subchannel pool gives each lane its own TCP connection
            options = CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)] if lane else CHANNEL_OPTIONS
            if self._tls is not None:
                options = options + self._tls.channel_options()
                ch = grpc.aio.secure_channel(address, self._credentials, options=options)
            else:
                ch = grpc.aio.insecure_channel(address, options=options)
            self._channels[key] = ch
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
