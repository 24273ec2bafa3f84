"""The loop: what reaches the adapter, what is logged, and how a failing tick is survived."""

from __future__ import annotations

import logging

from gateway.planner.adapters import AdapterError, DryRunAdapter
from gateway.planner.loop import PlanLoop
from gateway.planner.policy import Policy, PolicyConfig
from gateway.planner.signals import PoolSignals, Signals

FAST = PolicyConfig(up_stabilization_s=15, cooldown_s=0)  # grows on the first tick that asks


def busy_prefill(up: int = 2) -> Signals:
    """Prefill workers running twice their target; decode on target."""
    return Signals({"prefill": PoolSignals(up, 1.5 * up, 0, 0), "decode": PoolSignals(2, 64, 0, 0.5)}, 1.0, 0.05, 40)


class Recorder:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.applied: list[dict[str, int]] = []

    def current(self) -> dict[str, int]:
        return dict(self.sizes)

    def apply(self, sizes: dict[str, int]) -> None:
        self.applied.append(sizes)
        self.sizes.update(sizes)


def test_only_changed_pools_are_applied_and_each_change_is_logged(caplog):
    adapter = Recorder({"prefill": 2, "decode": 2})
    caplog.set_level(logging.INFO, logger="gateway.planner.loop")
    recs = PlanLoop(busy_prefill, Policy(FAST), adapter).tick()
    assert adapter.applied == [{"prefill": 4}]
    assert not recs["decode"].changed
    changes = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert changes == ["prefill 2 -> 4: running/worker 1.5 vs target 0.75"]


def test_dry_run_starts_from_the_workers_the_gateways_see():
    lines: list[str] = []
    adapter = DryRunAdapter(lines.append)
    loop = PlanLoop(busy_prefill, Policy(FAST), adapter)
    assert loop.current(busy_prefill()) == {"prefill": 2, "decode": 2}
    loop.tick()
    assert lines == ["dry run, not applied: prefill=4"]
    assert loop.current(busy_prefill()) == {"prefill": 4, "decode": 2}  # what it would have set


def test_no_signals_apply_nothing():
    adapter = Recorder({"prefill": 2, "decode": 2})
    recs = PlanLoop(lambda: None, Policy(FAST), adapter).tick()
    assert adapter.applied == [] and "no prefill signals" in recs["prefill"].reason


def test_run_keeps_its_schedule_and_survives_a_failing_tick(caplog):
    now = [100.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    class Flaky(Recorder):
        def current(self) -> dict[str, int]:
            now[0] += 2.0  # a slow API
            if len(sleeps) == 1:
                raise AdapterError("kubernetes: GET ... answered 503")
            return super().current()

    adapter = Flaky({"prefill": 2, "decode": 2})
    ups = iter([2, 2, 4])  # by the third tick the two new workers are up, and busy too
    PlanLoop(lambda: busy_prefill(next(ups)), Policy(FAST), adapter).run(
        15.0, ticks=3, clock=lambda: now[0], sleep=sleep
    )
    assert sleeps == [13.0, 13.0]  # no sleep after the last tick
    assert "planner tick failed" in caplog.text and "503" in caplog.text
    assert adapter.applied == [{"prefill": 4}, {"prefill": 8}]  # ticks 1 and 3; tick 2 failed
