"""One request through the workers: prefill → first token to the client → decode (KV pulled by the
decode worker) → the rest. With no prefill worker up, the decode worker prefills locally."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from common.engine.sampling import SamplingParams
from common.rpc import decode_pb2, decode_pb2_grpc, kv_pb2, kv_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from common.rpc.channels import ChannelPool
from common.rpc.convert import params_to_proto
from common.settings import GatewaySettings
from gateway.errors import APIError, from_grpc
from gateway.registry import StaticRegistry

log = logging.getLogger(__name__)


@dataclass
class Delta:
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    text: str | None = None  # the worker's final text, cut at a stop string
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Route:
    mode: str  # "disaggregated" | "colocated"
    prefill: str | None
    decode: str
    transfer: dict = field(default_factory=dict)


class Orchestrator:
    def __init__(self, registry: StaticRegistry, channels: ChannelPool, settings: GatewaySettings) -> None:
        self.registry = registry
        self.channels = channels
        self.settings = settings
        self._background: set[asyncio.Task] = set()

    def route(self) -> Route:
        decode = self.registry.pick("decode")
        if decode is None:
            raise APIError(503, "no decode worker is available", "server_error", code="no_workers")
        prefill = self.registry.pick("prefill")
        if prefill is None:
            return Route("colocated", None, decode.address)
        return Route("disaggregated", prefill.address, decode.address)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, route: Route
    ) -> AsyncIterator[Delta]:
        wire = params_to_proto(params)
        if route.prefill is None:
            stub = decode_pb2_grpc.DecodeServiceStub(self.channels.get(route.decode))
            call = stub.Generate(
                decode_pb2.GenerateRequest(request_id=request_id, token_ids=prompt_ids, params=wire),
                timeout=self.settings.request_timeout_s,
            )
            async for delta in self._stream(call, route.decode, route, params):
                yield delta
            return

        prefill = prefill_pb2_grpc.PrefillServiceStub(self.channels.get(route.prefill))
        try:
            resp = await prefill.Prefill(
                prefill_pb2.PrefillRequest(request_id=request_id, token_ids=prompt_ids, params=wire),
                timeout=self.settings.prefill_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, route.prefill) from e
        cached = resp.usage.cached_tokens
        yield Delta(
            [resp.first_token],
            resp.finished,
            resp.finish_reason or None,
            resp.text if resp.finished else None,
            resp.usage.prompt_tokens,
            1,
            cached,
        )
        if resp.finished:
            return
        handle = resp.handle
        finished = False
        try:
            stub = decode_pb2_grpc.DecodeServiceStub(self.channels.get(route.decode))
            call = stub.Decode(
                decode_pb2.DecodeRequest(
                    request_id=request_id,
                    handle=handle,
                    prompt_token_ids=prompt_ids,
                    first_token=resp.first_token,
                    params=wire,
                    transfer=self.settings.transfer,
                ),
                timeout=self.settings.request_timeout_s,
            )
            async for delta in self._stream(call, route.decode, route, params):
                delta.cached_tokens = cached
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                # Decode failed or the client went away: unpin the prefill KV now, not at lease expiry.
                # Idempotent: a no-op if the decode worker had already released it.
                self._spawn(self._release(route.prefill, handle.request_id))

    async def _stream(
        self, call: grpc.aio.UnaryStreamCall, worker: str, route: Route, params: SamplingParams
    ) -> AsyncIterator[Delta]:
        done = False
        try:
            async for chunk in call:
                if chunk.HasField("transfer"):
                    t = chunk.transfer
                    route.transfer = {"backend": t.backend, "blocks": t.blocks, "bytes": t.bytes, "seconds": t.seconds}
                done = chunk.finished
                yield Delta(
                    list(chunk.token_ids),
                    chunk.finished,
                    chunk.finish_reason or None,
                    chunk.text if chunk.finished and params.stop else None,
                    chunk.usage.prompt_tokens,
                    chunk.usage.completion_tokens,
                    chunk.usage.cached_tokens,
                )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, worker) from e
        finally:
            if not done:
                call.cancel()  # the client went away: the worker aborts and frees the blocks

    async def _release(self, address: str, request_id: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            stub = kv_pb2_grpc.KVServiceStub(self.channels.get(address))
            await stub.Release(kv_pb2.ReleaseRequest(request_id=request_id), timeout=5.0)

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
