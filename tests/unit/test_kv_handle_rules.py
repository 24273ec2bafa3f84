"""The rules of a KV handle, without processes: what a signature covers, when a lease ends, the
prompt binding, and which sources a decode worker may dial."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.errors import PermissionDeniedError
from common.rpc import types_pb2
from decode_worker.sources import TrustedSources, is_loopback
from kvtransfer.handles import HandleSigner, check_prompt, prompt_digest

PROMPT = list(range(40))


def _handle(signer: HandleSigner, endpoint: str = "10.0.0.5:50051", ttl: float = 10.0) -> types_pb2.KVHandle:
    h = types_pb2.KVHandle(
        worker_id="prefill-1",
        request_id="r1",
        block_ids=[3, 4, 5],
        transfer_endpoint=endpoint,
        lease_deadline_unix=time.time() + ttl,
        num_tokens=40,
        prompt_digest=prompt_digest(PROMPT),
    )
    h.layout.block_size = 16
    return signer.sign(h)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h: setattr(h, "worker_id", "prefill-2"),
        lambda h: setattr(h, "request_id", "r2"),
        lambda h: h.block_ids.append(6),
        lambda h: setattr(h.layout, "block_size", 32),
        lambda h: setattr(h, "transfer_endpoint", "10.0.0.6:50051"),
        lambda h: setattr(h, "lease_deadline_unix", h.lease_deadline_unix + 1),
        lambda h: setattr(h, "num_tokens", 41),
        lambda h: setattr(h, "prompt_digest", prompt_digest([1])),
    ],
)
def test_every_field_is_signed(tamper):
    signer = HandleSigner()
    h = _handle(signer)
    signer.verify(h)
    tamper(h)
    with pytest.raises(PermissionDeniedError, match="does not verify"):
        signer.verify(h)


def test_another_key_and_an_ended_lease_are_refused_but_release_needs_no_deadline():
    a, b = HandleSigner(), HandleSigner()
    with pytest.raises(PermissionDeniedError):
        b.verify(_handle(a))
    old = _handle(a, ttl=-1)
    with pytest.raises(PermissionDeniedError, match="expired"):
        a.verify(old)
    a.verify(old, check_deadline=False)
    shared = b"k" * 32
    HandleSigner(shared).verify(_handle(HandleSigner(shared)))


def test_the_prompt_binding():
    h = _handle(HandleSigner())
    check_prompt(h, PROMPT)
    with pytest.raises(PermissionDeniedError, match="another prompt"):
        check_prompt(h, PROMPT[:-1] + [999])
    h.ClearField("prompt_digest")
    with pytest.raises(PermissionDeniedError):
        check_prompt(h, PROMPT)


def test_which_sources_a_decode_worker_dials():
    signer = HandleSigner()
    remote, local = _handle(signer), _handle(signer, endpoint="127.0.0.1:50051")
    check = lambda sources, h: asyncio.run(sources.check(h))  # noqa: E731

    bare = TrustedSources(None, [])
    check(bare, local)  # nothing configured: loopback only
    with pytest.raises(PermissionDeniedError, match="not a known prefill worker"):
        check(bare, remote)
    listed = TrustedSources(None, ["10.0.0.5:50051"])
    check(listed, remote)
    with pytest.raises(PermissionDeniedError):
        check(listed, local)  # a list, once given, is the whole truth
    keyed = TrustedSources(signer, [])
    check(keyed, remote)  # a handle verified with the shared key names a genuine source
    with pytest.raises(PermissionDeniedError):
        check(keyed, _handle(HandleSigner(), endpoint="127.0.0.1:1"))


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("[::1]:5", True),
        ("localhost:9", True),
        ("10.1.1.1:1", False),
        ("example.com:443", False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback
