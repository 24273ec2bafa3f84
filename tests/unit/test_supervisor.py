"""The supervisor's decisions, on a scripted orchestrator: retry before the first token, migrate
after it (prompt + sent tokens, the rest of max_tokens), one stream's usage, the budget, and
failures that must not be retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from common.engine.sampling import SamplingParams
from common.settings import MigrationSettings
from gateway.errors import APIError, WorkerFailure
from gateway.orchestrator import Delta, Route
from gateway.supervisor import Outcome, Supervisor


class _Scripted:
    """Each attempt plays the next script: a list of deltas, possibly ending in a failure."""

    def __init__(self, scripts: list[list]) -> None:
        self.scripts = scripts
        self.calls: list[tuple[str, list[int], int, frozenset]] = []
        self.avoided: list[frozenset] = []

    def route(
        self, prompt_ids: list[int], avoid: frozenset = frozenset(), cache_salt: str = "", model: str = ""
    ) -> Route:
        self.avoided.append(avoid)
        n = len(self.avoided)
        return Route("disaggregated", f"p{n}:1", f"d{n}:1", prefill_id=f"p{n}", decode_id=f"d{n}")

    async def attempt(self, request_id, prompt_ids, params, route, placement=None) -> AsyncIterator[Delta]:  # noqa: ANN001
        self.calls.append((request_id, list(prompt_ids), params.max_tokens, route.decode))
        for step in self.scripts[len(self.calls) - 1]:
            if isinstance(step, BaseException):
                raise step
            yield step


class _Registry:
    def __init__(self) -> None:
        self.down: list[str] = []

    def mark_down(self, address: str, reason: str) -> None:
        self.down.append(address)


def _fail(code: str, status: int = 503, worker: str = "d1:1") -> WorkerFailure:
    return WorkerFailure(status, f"{code} on {worker}", worker, "decode", code)


def _serve(scripts: list[list], attempts: int = 3) -> tuple[list[Delta], _Scripted, _Registry, Outcome]:
    orch, reg, outcome = _Scripted(scripts), _Registry(), Outcome()
    sup = Supervisor(orch, reg, MigrationSettings(max_attempts=attempts))  # type: ignore[arg-type]

    async def run() -> list[Delta]:
        return [d async for d in sup.serve("r1", [1, 2, 3], SamplingParams.create(max_tokens=5), outcome)]

    return asyncio.run(run()), orch, reg, outcome


def test_a_failure_after_tokens_migrates_with_prompt_plus_sent_tokens():
    deltas, orch, reg, outcome = _serve(
        [
            [Delta([10], prompt_tokens=3, completion_tokens=1, cached_tokens=2), Delta([11]), _fail("worker_lost")],
            [Delta([12], prompt_tokens=5, completion_tokens=1), Delta([13, 14], True, "length", None, 5, 3, 0)],
        ]
    )
    assert [t for d in deltas for t in d.token_ids] == [10, 11, 12, 13, 14]
    assert orch.calls[1] == ("r1~1", [1, 2, 3, 10, 11], 3, "d2:1")  # the rest of max_tokens, elsewhere
    assert orch.avoided[1] == {"d1:1"} and reg.down == ["d1:1"]
    last = deltas[-1]
    assert (last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (3, 5, 2)  # one stream
    assert outcome.migrations == ["worker_lost"] and outcome.retries == [] and outcome.attempts == 2


def test_a_failure_before_any_token_is_a_retry():
    deltas, orch, reg, outcome = _serve(
        [[_fail("worker_unavailable", worker="p1:1")], [Delta([7], True, "stop", None, 3, 1, 0)]]
    )
    assert [d.token_ids for d in deltas] == [[7]] and orch.calls[1][1] == [1, 2, 3]
    assert outcome.retries == ["worker_unavailable"] and outcome.migrations == []


def test_a_refused_request_is_not_retried():
    with pytest.raises(WorkerFailure) as e:
        _serve([[_fail("invalid_request", status=400)], [Delta([7], True, "stop")]])
    assert e.value.status == 400


def test_the_budget_ends_it_with_the_last_failure():
    with pytest.raises(WorkerFailure) as e:
        _serve([[Delta([1]), _fail("worker_stalled")], [_fail("worker_lost")], [Delta([9], True, "stop")]], attempts=2)
    assert e.value.code == "worker_lost"


def test_a_slow_decode_worker_is_avoided_but_not_marked_down():
    _, orch, reg, _ = _serve([[Delta([1]), _fail("overloaded")], [Delta([2], True, "length")]])
    assert orch.avoided[1] == {"d1:1"} and reg.down == []


def test_avoiding_is_a_preference_when_no_other_worker_is_left():
    class _OnlyOne(_Scripted):
        def route(self, prompt_ids, avoid=frozenset(), cache_salt="", placement=None):  # noqa: ANN001, ANN201
            if avoid:
                raise APIError(503, "no decode worker can take the request", "server_error", code="no_workers")
            return super().route(prompt_ids, avoid, cache_salt)

    orch, reg, outcome = (
        _OnlyOne([[Delta([1]), _fail("kv_transfer_failed")], [Delta([2], True, "length")]]),
        _Registry(),
        Outcome(),
    )
    sup = Supervisor(orch, reg, MigrationSettings())  # type: ignore[arg-type]

    async def run() -> list[Delta]:
        return [d async for d in sup.serve("r", [5], SamplingParams.create(max_tokens=2), outcome)]

    assert [t for d in asyncio.run(run()) for t in d.token_ids] == [1, 2]


def test_nowhere_to_go_after_a_failure_reports_the_failure_not_the_routing():
    class _NoneLeft(_Scripted):
        def route(self, prompt_ids, avoid=frozenset(), cache_salt="", placement=None):  # noqa: ANN001, ANN201
            if self.avoided:
                raise APIError(503, "no decode worker can take the request", "server_error", code="no_workers")
            return super().route(prompt_ids, avoid, cache_salt)

    sup = Supervisor(_NoneLeft([[Delta([1]), _fail("worker_lost")]]), _Registry(), MigrationSettings())  # type: ignore[arg-type]

    async def run() -> list[Delta]:
        return [d async for d in sup.serve("r", [5], SamplingParams.create(max_tokens=4), Outcome())]

    with pytest.raises(WorkerFailure) as e:
        asyncio.run(run())
    assert e.value.code == "worker_lost" and "no other worker" in e.value.message
