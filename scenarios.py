"""Contention scenarios: real background load the trainer switches between episodes.

The policy never sees the scenario's name, only the telemetry it causes; the name keys the
latency table and separates results in reports.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Scenario:
    name: str
    cpu_workers: int = 0          # busy-loop processes
    duty_cycle: float = 1.0       # fraction of each period a worker spins
    ballast_mb: int = 0           # memory held while the scenario runs

    def to_dict(self) -> dict:
        return asdict(self)


def presets() -> dict[str, Scenario]:
    cores = os.cpu_count() or 1
    return {
        "idle": Scenario("idle"),
        "light": Scenario("light", cpu_workers=max(1, cores // 2), duty_cycle=0.5),
        "loaded": Scenario("loaded", cpu_workers=cores, duty_cycle=1.0),
        "memory": Scenario("memory", ballast_mb=2048),
    }


def parse_scenarios(spec: str) -> list[Scenario]:
    known = presets()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown scenario(s) {unknown or spec!r}: choose from {', '.join(known)}")
    return [known[n] for n in dict.fromkeys(names)]


class ScenarioSchedule:
    """Blocks of `block` episodes, each under a scenario drawn with a seeded RNG."""

    def __init__(self, scenarios: list[Scenario], block: int, seed: int):
        if block < 1:
            raise ValueError("--scenario-block must be >= 1")
        self.scenarios, self.block, self.seed = scenarios, block, seed

    def scenario_for(self, episode: int) -> Scenario:
        block_index = episode // self.block
        rng = np.random.default_rng([self.seed, block_index])
        return self.scenarios[int(rng.integers(len(self.scenarios)))]


def contention(scenario: Scenario):
    """Context manager running the scenario's load; idle scenarios run nothing."""
    if scenario.cpu_workers == 0 and scenario.ballast_mb == 0:
        return contextlib.nullcontext()
    from load_generator import LoadGenerator
    return LoadGenerator(cpu_workers=scenario.cpu_workers, duty_cycle=scenario.duty_cycle,
                         ballast_mb=scenario.ballast_mb)
