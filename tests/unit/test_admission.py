"""Admission control, table-driven: the queue limits scale with the pool, batch is shed first and
never takes interactive work's share, and a rejection is a 429 with Retry-After."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.settings import AdmissionSettings
from gateway.admission import Admission
from gateway.errors import APIError
from gateway.inflight import InflightLedger


class _Registry:
    def __init__(self, prefill: int, decode: int = 1, reported_waiting: int = 0) -> None:
        stats = SimpleNamespace(waiting=reported_waiting)
        self.pools = {
            "prefill": [SimpleNamespace(stats=stats) for _ in range(prefill)],
            "decode": [SimpleNamespace(stats=stats) for _ in range(decode)],
        }

    def healthy(self, role: str) -> list:
        return self.pools[role]


def _fill(adm: Admission, n: int, tokens: int = 10) -> list:
    tickets = [adm.ticket(tokens, "interactive") for _ in range(n)]
    for t in tickets:
        t.__enter__()
    return tickets


SETTINGS = AdmissionSettings(max_waiting_per_worker=4, max_queued_prompt_tokens_per_worker=1000, batch_share=0.5)


@pytest.mark.parametrize(
    ("prefill", "waiting", "reported", "priority", "tokens", "admitted"),
    [
        (1, 0, 0, "interactive", 10, True),
        (1, 3, 0, "interactive", 10, True),  # the 4th of 4
        (1, 4, 0, "interactive", 10, False),
        (2, 4, 0, "interactive", 10, True),  # limits scale with the pool
        (1, 1, 0, "batch", 10, True),  # batch: half of 4
        (1, 2, 0, "batch", 10, False),
        (1, 0, 4, "interactive", 10, False),  # workers report a queue this gateway did not fill
        (1, 1, 0, "interactive", 995, False),  # 10 + 995 prompt tokens > 1000
        (1, 0, 0, "interactive", 5000, True),  # a huge prompt still enters an empty queue
        (0, 4, 0, "interactive", 10, False),  # no prefill pool: the decode pool prefills (1 worker)
    ],
)
def test_admission(prefill, waiting, reported, priority, tokens, admitted):
    adm = Admission(SETTINGS, _Registry(prefill, reported_waiting=reported))  # type: ignore[arg-type]
    held = _fill(adm, waiting)  # noqa: F841 - kept: a dropped ticket would leave the queue
    if admitted:
        with adm.ticket(tokens, priority):
            assert adm.waiting == waiting + 1
        assert adm.waiting == waiting  # leaving the block frees the place
    else:
        with pytest.raises(APIError) as e, adm.ticket(tokens, priority):
            pass
        assert e.value.status == 429 and e.value.type == "server_overloaded"
        assert e.value.headers() == {"Retry-After": "1"}
        assert adm.waiting == waiting


def test_a_failed_request_frees_its_place():
    adm = Admission(SETTINGS, _Registry(1))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError), adm.ticket(10, "interactive"):
        raise RuntimeError("worker failed")
    assert adm.waiting == 0 and adm.waiting_tokens == 0


def test_pending_blocks_count_until_a_poll_after_the_reservation():
    ledger = InflightLedger()
    c = ledger.charge(("p", "d"), 100, "d", 7)
    assert ledger.tokens == {"p": 100, "d": 100}
    assert ledger.pending_blocks("d", stats_seen_at=0.0) == 7  # not reserved yet
    ledger.reserved(c)
    assert ledger.pending_blocks("d", stats_seen_at=0.0) == 7  # the last poll predates it
    assert ledger.pending_blocks("d", stats_seen_at=c.reserved_at + 1) == 0  # a later poll shows it
    ledger.settle(c)
    ledger.settle(c)  # idempotent
    assert ledger.tokens == {} and ledger.pending_blocks("d", 0.0) == 0
