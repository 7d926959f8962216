"""Contention scenarios: real background load the trainer switches between episodes.

The policy never sees the scenario's name, only the telemetry it causes; the name keys the
latency table and separates results in reports.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from machine.load_generator import LoadGenerator, LoadLevel

SETTLE_S = 0.5   # > two telemetry samples at the default rate, so the first decision under load sees it


@dataclass(frozen=True)
class Scenario:
    name: str
    load: LoadLevel | None = None      # None: nothing extra runs
    min_slowdown: float = 1.0          # the dense model must decode at least this much slower, or the level failed

    @property
    def loaded(self) -> bool:
        return self.load is not None

    def to_dict(self) -> dict:
        return asdict(self)


def presets() -> dict[str, Scenario]:
    """Levels scale with this machine's core count, so 'loaded' means the same on any host.

    ``min_slowdown`` is what each level must do to the dense model's decode step (checked when the
    level starts and during calibration, environments.latency_calibration); memory ballast is not
    expected to slow anything while RAM is free, so it has no minimum.
    """
    cores = os.cpu_count() or 1
    return {
        "idle": Scenario("idle"),
        "light": Scenario("light", LoadLevel(workers=max(1, cores // 2), duty=0.5), min_slowdown=1.05),
        "moderate": Scenario("moderate", LoadLevel(workers=max(1, cores // 2), duty=1.0), min_slowdown=1.2),
        "heavy": Scenario("heavy", LoadLevel(workers=cores, duty=1.0), min_slowdown=1.5),
        "stream": Scenario("stream", LoadLevel(workers=max(1, cores // 2), duty=1.0, stream_mib=64),
                           min_slowdown=1.2),
        "loaded": Scenario("loaded", LoadLevel(workers=cores, duty=1.0), min_slowdown=1.5),
        "memory": Scenario("memory", LoadLevel(workers=0, ballast_mib=2048)),
    }


def parse_scenarios(spec: str) -> list[Scenario]:
    known = presets()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown scenario(s) {unknown or spec!r}: choose from {', '.join(known)}")
    return [known[n] for n in dict.fromkeys(names)]


class ScenarioSchedule:
    """Blocks of `block` episodes; every round of len(scenarios) blocks is a seeded permutation.

    Balanced rather than drawn independently per block: a short run (the demo has four blocks)
    must see every scenario, or the policy cannot learn how load changes the best action.
    """

    def __init__(self, scenarios: list[Scenario], block: int, seed: int):
        if block < 1:
            raise ValueError("--scenario-block must be >= 1")
        self.scenarios, self.block, self.seed = scenarios, block, seed

    def scenario_for(self, episode: int) -> Scenario:
        round_, slot = divmod(episode // self.block, len(self.scenarios))
        order = np.random.default_rng([self.seed, round_]).permutation(len(self.scenarios))
        return self.scenarios[int(order[slot])]


@contextlib.contextmanager
def contention(scenario: Scenario, settle_s: float = SETTLE_S) -> Iterator[None]:
    """Run the scenario's load for as long as the block runs, entering it once the load has settled.

    The wait lets the telemetry sampler's CPU window see the load before the first decision under it.
    """
    if not scenario.loaded:
        yield
        return
    with LoadGenerator(scenario.load):
        time.sleep(settle_s)
        yield
