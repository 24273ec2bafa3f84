"""A request's outcome and phases: the mapping from statuses and error codes, the first word wins,
and phases that tile the request's time."""

from __future__ import annotations

import pytest

from gateway.request_record import PHASES, PhaseClock, RequestRecord, outcome_of


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        (200, None, "ok"),
        (400, "invalid_request_error", "client_error"),
        (404, "model_not_found", "client_error"),
        (413, "request_too_large", "client_error"),
        (429, "queue_full", "overloaded"),
        (499, None, "cancelled"),
        (502, "worker_lost", "worker_lost"),
        (503, "worker_unavailable", "worker_lost"),
        (502, "kv_transfer_failed", "worker_lost"),
        (504, "worker_stalled", "timeout"),
        (504, None, "timeout"),
        (503, "no_workers", "server_error"),
        (500, "internal_error", "server_error"),
    ],
)
def test_outcome_of(status, code, outcome):
    assert outcome_of(status, code) == outcome


def test_the_first_word_on_a_request_is_kept():
    r = RequestRecord()
    r.cancel()
    r.fail(502, "worker_lost", "the stream broke after the client left")
    assert (r.outcome, r.error_type, r.finish_reason) == ("cancelled", "client_disconnected", "abort")
    r = RequestRecord()
    r.fail(502, "worker_lost", "decode worker died")
    r.cancel()
    assert (r.outcome, r.finish_reason) == ("worker_lost", "error")


def test_a_4xx_has_no_finish_reason_and_success_keeps_the_workers_reason():
    r = RequestRecord()
    r.fail(400, "invalid_request_error", "max_tokens must be at least 1")
    assert r.outcome == "client_error" and r.finish_reason is None
    r = RequestRecord()
    r.succeed("length")
    assert (r.outcome, r.finish_reason) == ("ok", "length")


def test_phases_tile_the_request_and_repeated_phases_add_up():
    clock = PhaseClock(now=100.0)
    for t, phase in ((100.5, "admission"), (100.6, "schedule"), (100.7, "prefill"), (102.0, "decode")):
        clock.enter(phase, now=t)
    clock.enter("schedule", now=103.0)  # a migration: schedule, prefill and decode again
    clock.enter("prefill", now=103.1)
    clock.enter("decode", now=103.5)
    clock.enter("respond", now=104.0)
    totals = clock.close(now=104.25)
    assert set(totals) == set(PHASES)
    assert totals["prefill"] == pytest.approx(1.3 + 0.4)
    assert totals["decode"] == pytest.approx(1.0 + 0.5)
    assert totals["schedule"] == pytest.approx(0.2)
    assert sum(totals.values()) == pytest.approx(4.25)
