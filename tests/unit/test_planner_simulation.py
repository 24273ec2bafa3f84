"""The planner against a simulated deployment under synthetic load curves: it must follow load,
meet the SLOs once settled, and never flap.

The model, per 15 s tick: requests arrive at `base_rate * load` per second (with noise). A
prefill worker serves 1 / prefill_s prompts per second (M/D/1-like queueing, plus a backlog when
arrivals exceed capacity), so TTFT grows as utilisation nears 1. A request then decodes for
decode_s seconds, so decode_s * rate sequences want to run; a decode worker holds decode_slots of
them, KV usage is running / slots and TPOT grows with it. New workers are ready startup_ticks
after they are asked for; removed ones go at once."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import pytest

from gateway.planner.loop import PlanLoop
from gateway.planner.policy import Policy, PolicyConfig
from gateway.planner.signals import PoolSignals, Signals

TTFT_SLO, TPOT_SLO = 2.0, 0.1
CFG = PolicyConfig(ttft_slo_s=TTFT_SLO, tpot_slo_s=TPOT_SLO, max_prefill=10, max_decode=10)
WINDOW = CFG.ticks(CFG.down_stabilization_s)  # 20 ticks
COOLDOWN = CFG.ticks(CFG.cooldown_s)  # 3 ticks
UNDAMPED = PolicyConfig(
    max_prefill=10,
    max_decode=10,
    up_stabilization_s=15,
    down_stabilization_s=15,
    cooldown_s=0,
    tolerance=0,
    max_down_fraction=1,
)


@dataclass
class Cluster:
    base_rate: float = 4.0  # requests/s at load 1
    prefill_s: float = 0.15
    decode_s: float = 8.0
    decode_slots: int = 64
    startup_ticks: int = 3
    dt: float = 15.0
    noise: float = 0.05
    seed: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: {"prefill": 1, "decode": 1})

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.now = 0
        self.ready = dict(self.sizes)
        self.starting: dict[str, list[int]] = {role: [] for role in self.sizes}
        self.backlog = 0.0
        self.slo_met = True

    # the adapter side
    def current(self) -> dict[str, int]:
        return dict(self.sizes)

    def apply(self, sizes: dict[str, int]) -> None:
        for role, n in sizes.items():
            extra = n - self.sizes[role]
            if extra > 0:
                self.starting[role] += [self.now + self.startup_ticks] * extra
            for _ in range(-extra):  # workers still starting go first
                if self.starting[role]:
                    self.starting[role].pop()
                else:
                    self.ready[role] -= 1
            self.sizes[role] = n

    # the gateway side
    def step(self, load: float) -> Signals:
        self.now += 1
        for role, due in self.starting.items():
            self.ready[role] += sum(1 for t in due if t <= self.now)
            self.starting[role] = [t for t in due if t > self.now]
        rate = self.base_rate * load * max(0.0, 1 + self.rng.gauss(0, self.noise))
        n = self.ready["prefill"]
        capacity = n / self.prefill_s
        work = rate * self.dt + self.backlog
        busy = min(1.0, work / (capacity * self.dt))
        self.backlog = max(0.0, work - capacity * self.dt)
        rho = min(rate / capacity, 0.97)
        queued = n * rho * rho / (2 * (1 - rho))
        ttft = self.prefill_s * (1 + 2 * rho / (1 - rho)) + self.backlog / capacity if rate else None
        slots = self.ready["decode"] * self.decode_slots
        wanted = rate * self.decode_s
        running = min(wanted, slots)
        tpot = 0.02 + 0.1 * (running / slots) ** 2 if rate else None
        self.slo_met = (ttft is None or ttft <= TTFT_SLO) and (tpot is None or tpot <= TPOT_SLO)
        pools = {
            "prefill": PoolSignals(n, n * busy, self.backlog + queued, 0.0),
            "decode": PoolSignals(self.ready["decode"], running, wanted - running, running / slots),
        }
        return Signals(pools, ttft, tpot, round(rate * self.dt))


@dataclass
class Run:
    prefill: list[int]
    decode: list[int]
    slo_met: list[bool]

    def pools(self) -> Iterator[list[int]]:
        yield self.prefill
        yield self.decode


def simulate(curve: list[float], cfg: PolicyConfig = CFG, **cluster: object) -> Run:
    """Drive the real loop (signals -> policy -> adapter) one tick per load value."""
    sim = Cluster(**cluster)  # type: ignore[arg-type]
    loads = iter(curve)
    loop = PlanLoop(lambda: sim.step(next(loads)), Policy(cfg), sim)
    run = Run([], [], [])
    for _ in curve:
        loop.tick()
        run.prefill.append(sim.sizes["prefill"])
        run.decode.append(sim.sizes["decode"])
        run.slo_met.append(sim.slo_met)
    return run


def changes(sizes: list[int]) -> list[tuple[int, int]]:
    """(tick, +1 or -1) for every change of size."""
    return [(t + 1, 1 if b > a else -1) for t, (a, b) in enumerate(pairwise(sizes)) if a != b]


def reversals(sizes: list[int]) -> int:
    moves = [d for _, d in changes(sizes)]
    return sum(1 for a, b in pairwise(moves) if a != b)


def flaps(sizes: list[int], within: int) -> int:
    """Up-down-up or down-up-down sequences completed within `within` ticks."""
    c = changes(sizes)
    return sum(1 for x, y, z in zip(c, c[1:], c[2:], strict=False) if x[1] != y[1] != z[1] and z[0] - x[0] <= within)


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


SEEDS = [0, 1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
def test_ramp_is_followed(seed):
    """Load rises 1x -> 6x over an hour, then holds."""
    curve = [1 + 5 * min(1.0, t / 240) for t in range(320)]
    run = simulate(curve, seed=seed)
    assert share(run.slo_met) >= 0.9
    assert share(run.slo_met[-60:]) >= 0.95  # settled
    assert run.prefill[-1] >= math.ceil(3.6 / CFG.prefill_running_target)  # 6x: 3.6 busy prefill workers
    assert run.decode[-1] >= math.ceil(6 * 4 * 8 / CFG.decode_running_target)  # 192 sequences
    assert all(d > 0 for _, d in changes(run.decode))  # linear signals: decode only ever grows
    for sizes in run.pools():
        assert flaps(sizes, 2 * WINDOW) == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_spike_is_followed_up_quickly_and_down_patiently(seed):
    """1x, then 8x for five minutes (ticks 40-59), then 1x again."""
    start, end = 40, 60
    curve = [8.0 if start <= t < end else 1.0 for t in range(200)]
    run = simulate(curve, seed=seed)
    for sizes in run.pools():
        assert sizes[start - 1] == sizes[0]  # calm before
        assert changes(sizes)[0][0] <= start + 2  # the spike's second tick confirms it
        assert max(sizes[start:end]) >= 7
        assert flaps(sizes, 2 * WINDOW) == 0
    assert share(run.slo_met[start + 16 : end]) == 1.0  # met again once the new workers started
    back = end + WINDOW + 3 * COOLDOWN + 3  # the window, then at most halving per cooldown
    assert run.prefill[back] == 1 and run.decode[back] <= 2  # 1x needs 1 (decode: 32 of 32 sequences)
    assert run.prefill[back:] == [run.prefill[back]] * len(run.prefill[back:])


@pytest.mark.parametrize("seed", SEEDS)
def test_diurnal_load_is_followed_without_flapping(seed):
    """Three 2-hour 'days' of a sine between 1x and 6x."""
    cycles, period = 3, 480
    curve = [1 + 2.5 * (1 - math.cos(2 * math.pi * t / period)) for t in range(cycles * period)]
    run = simulate(curve, seed=seed)
    assert share(run.slo_met) >= 0.95
    for sizes in run.pools():
        assert reversals(sizes) <= 2 * cycles  # up all morning, down all evening
        assert len(changes(sizes)) <= 10 * cycles
        assert flaps(sizes, 2 * WINDOW) == 0
        assert min(sizes[period // 2 :: period]) >= 5  # each noon: sized for 6x
        assert max(sizes[period::period]) <= 2  # each midnight: back near the minimum


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_damping_matters_on_a_noisy_constant_load(seed):
    """A constant 3x with noise: damped, no change once settled; undamped, it flaps."""
    curve = [3.0] * 400
    damped = simulate(curve, seed=seed)
    undamped = simulate(curve, UNDAMPED, seed=seed)
    settle = 60
    for sizes in damped.pools():
        assert changes(sizes[settle:]) == []
    assert share(damped.slo_met[settle:]) == 1.0
    assert len(changes(undamped.decode[settle:])) >= 50
    assert flaps(undamped.decode, 2 * WINDOW) >= 20


def test_limits_hold_under_any_load():
    cfg = PolicyConfig(min_prefill=2, max_prefill=6, min_decode=2, max_decode=6)
    curve = [1.0] * 30 + [12.0] * 60 + [0.0] * 120
    run = simulate(curve, cfg)
    for sizes in run.pools():
        assert all(2 <= s <= 6 for s in sizes)
        assert max(sizes) == 6
        assert sizes[-1] == 2


def test_no_traffic_goes_down_to_the_minimum():
    curve = [5.0] * 60 + [0.0] * 60
    run = simulate(curve)
    quiet = 60 + WINDOW + 3 * COOLDOWN + 3
    for sizes in run.pools():
        assert sizes[59] >= 4
        assert sizes[quiet:] == [1] * len(sizes[quiet:])


def test_missing_signals_never_scale():
    """An overloaded deployment whose gateways stop answering: the planner holds."""
    sim = Cluster()
    answers = iter([sim.step(6.0), sim.step(6.0)] + [None] * 40)
    loop = PlanLoop(lambda: next(answers), Policy(CFG), sim)
    for _ in range(42):
        loop.tick()
    assert sim.sizes == {"prefill": 2, "decode": 1 + 5}  # grew on the two real ticks, then held
