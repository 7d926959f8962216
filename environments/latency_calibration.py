"""K latency tables per load level, each measured under the real load and verified to slow the model.

Why several: one calibration's speedups move by more than the differences the policy is meant to
exploit (the same checkpoints gave -0.127 and +0.118 after recalibrating), so the offline
environment samples a calibration per episode and the test's intervals resample calibrations.
Why verified: a load level that does not slow the dense model teaches nothing and, used silently,
makes a "loaded" result out of an idle machine. Each level's dense decode step is timed against
the idle reference when the load starts and throughout its calibration; a level below its
``min_slowdown`` is logged as a warning and listed in ``verification()`` (metrics.json
``load_verification``), never passed over in silence.

Rounds interleave the levels in a seeded order and alternate the train and test splits, so other
users' load and the machine's drift spread over every level and both splits. Each level's table is
measured per action under its load (interleaved dense/pruned pairs), not scaled from idle: scaling
put layer pruning's loaded speedup at 1.26 where measurement gave 1.06 (issue 16).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from machine.contention import Scenario, contention
from environments.live import IDLE, inert_in_bucket
from environments.latency_table import LatencyTable
from machine.load_signals import LoadAwareHardware, SlowdownTracker
from runtime.timing import TimingSession
from pruners import NONE, PruningAction

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
START_CHECKS = 3      # dense timings when a load starts


@dataclass
class LevelCalibration:
    """One latency table of one level, with the telemetry read while it was measured."""
    level: str
    round: int                          # calibration round; train and test rounds alternate
    split: str                          # "train" | "test"
    table: LatencyTable                 # entries keyed by scenario == level
    telemetry: list[list[float]]        # LoadAwareHardware vectors, one after each timing
    dense_per_token_s: dict[str, float]  # bucket -> median dense decode step over the table's pairs
    start_slowdown: float | None        # dense decode step when the load started / idle reference
    seconds: float

    @classmethod
    def from_dict(cls, d: dict) -> "LevelCalibration":
        return cls(**{**d, "table": LatencyTable.from_dict(d["table"])})


@dataclass
class CalibrationSet:
    levels: list[str]
    min_slowdown: dict[str, float]
    buckets: list[str]
    settings: dict
    calibrations: list[LevelCalibration] = field(default_factory=list)

    def select(self, split: str, level: str | None = None) -> list[LevelCalibration]:
        return [c for c in self.calibrations if c.split == split and (level is None or c.level == level)]

    def idle_of(self, cal: LevelCalibration) -> LevelCalibration:
        """The idle calibration of the same round: the budget's and the slowdown's reference."""
        for c in self.calibrations:
            if c.round == cal.round and c.level == IDLE:
                return c
        raise KeyError(f"round {cal.round} has no idle calibration: include 'idle' in the levels")

    def slowdown(self, cal: LevelCalibration) -> float:
        """Dense decode slowdown of this calibration against the same round's idle (geometric mean over buckets)."""
        idle = self.idle_of(cal)
        ratios = [cal.dense_per_token_s[b] / idle.dense_per_token_s[b] for b in self.buckets]
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios))

    def merged_table(self, cal: LevelCalibration) -> LatencyTable:
        """The calibration's entries plus its round's idle entries: what a live run's table would hold."""
        return LatencyTable({**self.idle_of(cal).table.entries, **cal.table.entries})

    def verification(self) -> dict:
        """Per level: its minimum, the slowdown at each start and during each calibration, the median of
        each split, and failures. A level fails when the median of either split is below its minimum:
        the training and the test calibrations must both have run under the load."""
        out = {}
        for level in self.levels:
            cals = [c for c in self.calibrations if c.level == level]
            during = [self.slowdown(c) for c in cals]
            floor = self.min_slowdown.get(level, 1.0)
            failed = [f"round {c.round}: {what} x{value:.2f} < x{floor:.2f}"
                      for c, d in zip(cals, during)
                      for what, value in (("start", c.start_slowdown), ("during", d))
                      if floor > 1.0 and value is not None and value < floor]
            median = statistics.median(during) if during else None
            by_split = {split: statistics.median(d for c, d in zip(cals, during) if c.split == split)
                        for split in SPLITS if any(c.split == split for c in cals)}
            failed_splits = [split for split, m in by_split.items() if floor > 1.0 and m < floor]
            out[level] = {"min_slowdown": floor, "start": [c.start_slowdown for c in cals], "during": during,
                          "median": median, "median_by_split": by_split, "failed_splits": failed_splits,
                          "failed_checks": failed, "failed": bool(failed_splits)}
        return out

    def to_dict(self) -> dict:
        return {"levels": self.levels, "min_slowdown": self.min_slowdown, "buckets": self.buckets,
                "settings": self.settings,
                "calibrations": [{**asdict(c), "table": c.table.to_dict()} for c in self.calibrations]}

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationSet":
        return cls(d["levels"], d["min_slowdown"], d["buckets"], d["settings"],
                   [LevelCalibration.from_dict(c) for c in d["calibrations"]])


def load_failures(verification: dict) -> list[str]:
    """One line per level that failed its minimum slowdown (empty when every load loaded)."""
    lines = []
    for level, v in verification.items():
        if not v["failed"]:
            continue
        splits = v.get("median_by_split") or {}
        where = (f" (median; {', '.join(f'{split} x{m:.2f}' for split, m in splits.items())}), below its minimum "
                 f"x{v['min_slowdown']:.2f} in the {' and '.join(v['failed_splits'])} calibrations" if splits
                 else f", below its minimum x{v['min_slowdown']:.2f}")
        lines.append(f"load level '{level}' slowed the dense model x{v['median']:.2f}{where}")
    return lines


def table_verification(table: LatencyTable, scenarios: Sequence[Scenario]) -> dict:
    """The live environment's load check, in ``CalibrationSet.verification``'s format: each scenario's
    dense decode step in the latency table against idle's (geometric mean over the buckets both have;
    one calibration per scenario, no split). A scaled table's loaded entries carry the slowdown it
    measured, a measured table's the per-action pairs' dense side."""
    out = {}
    for sc in scenarios:
        ratios = [table.entries[LatencyTable.key(sc.name, b, NONE.label)].dense_decode_per_token_s
                  / table.entries[LatencyTable.key(IDLE, b, NONE.label)].dense_decode_per_token_s
                  for b in ("short", "long")
                  if all(LatencyTable.key(name, b, NONE.label) in table.entries for name in (sc.name, IDLE))]
        if not ratios:
            continue
        slowdown = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        failed = sc.min_slowdown > 1.0 and slowdown < sc.min_slowdown
        out[sc.name] = {"min_slowdown": sc.min_slowdown, "start": [], "during": [slowdown], "median": slowdown,
                        "median_by_split": {}, "failed_splits": [],
                        "failed_checks": [f"table: during x{slowdown:.2f} < x{sc.min_slowdown:.2f}"] if failed else [],
                        "failed": failed}
    return out


class Calibrator:
    """Measures a CalibrationSet through a live environment's timer, with the sampler's telemetry."""

    def __init__(self, env, sampler, scenarios: Sequence[Scenario], actions: Sequence[PruningAction],
                 repeats: int, seed: int):
        if IDLE not in [s.name for s in scenarios]:
            raise ValueError("the offline environment needs the 'idle' level: it is every round's reference")
        self.env, self.sampler, self.scenarios, self.repeats, self.seed = env, sampler, list(scenarios), repeats, seed
        self.labels = [NONE.label] + [a.label for a in actions if a.label != NONE.label]

    def reference(self, buckets: Sequence[str]) -> dict[str, float]:
        """Dense decode step per bucket with no load started by us (the first start check's reference)."""
        self.env.engine.restore()
        self.env.time_action(NONE.label, buckets[0])   # warm-up
        return {b: statistics.median(self.env.time_action(NONE.label, b)[1] for _ in range(START_CHECKS))
                for b in buckets}

    def run(self, cs: CalibrationSet, rounds: int, save: Callable[[CalibrationSet], None]) -> CalibrationSet:
        """Measure the missing (round, level) calibrations of `rounds` rounds, saving after each."""
        done = {(c.round, c.level) for c in cs.calibrations}
        rng = np.random.default_rng([self.seed, 16])
        schedule = [(r, self.scenarios[int(i)]) for r in range(rounds) for i in rng.permutation(len(self.scenarios))]
        todo = [(r, sc) for r, sc in schedule if (r, sc.name) not in done]
        if todo:
            self._measure(cs, todo, rounds, save)
        # Every run that uses the set says so, a cached one too (a test run reads training's calibrations).
        for line in load_failures(cs.verification()):
            log.warning("LOAD FAILED: %s; its results are flagged in metrics.json load_verification", line)
        return cs

    def _measure(self, cs: CalibrationSet, todo: list[tuple[int, Scenario]], rounds: int,
                 save: Callable[[CalibrationSet], None]) -> None:
        log.info("calibrating %d latency tables (%d levels x %d rounds, %d actions, buckets %s)",
                 len(todo), len(self.scenarios), rounds, len(self.labels), cs.buckets)
        idle_now = self.reference(cs.buckets)
        # One timing session for every table: each action is warmed up once in this process (first-use
        # costs are per process), not once per table (a third of each table's runs).
        session = TimingSession()
        for r, sc in tqdm(todo, desc="calibrate levels"):
            with contention(sc):
                cal = self.calibrate(sc, r, cs.buckets, idle_now, session)
            if sc.name == IDLE:
                idle_now = cal.dense_per_token_s
            cs.calibrations.append(cal)
            save(cs)

    def calibrate(self, sc: Scenario, round_: int, buckets: Sequence[str], idle: dict[str, float],
                  session: TimingSession | None = None) -> LevelCalibration:
        started = time.perf_counter()
        tracker, telemetry = SlowdownTracker(), []
        # The runtime a live decision under this load gets (threads for the machine's state), as
        # PruningEnvironment.calibrate does; every entry records it.
        runtime = self.env.governor.govern(explore=False).label

        def timer(label: str, bucket: str) -> tuple[float, float]:
            prefill_s, per_token_s = self.env.time_action(label, bucket)
            if label == NONE.label:
                tracker.update(per_token_s, idle[bucket])
            telemetry.append(LoadAwareHardware(self.sampler.latest(), tracker.value).vector)
            return prefill_s, per_token_s

        start = None
        if sc.loaded:
            start = statistics.median(timer(NONE.label, buckets[0])[1] for _ in range(START_CHECKS)) / idle[buckets[0]]
            if start < sc.min_slowdown:
                log.warning("LOAD CHECK: level '%s' slowed the dense model only x%.2f when it started "
                            "(minimum x%.2f)", sc.name, start, sc.min_slowdown)
        table = LatencyTable()
        table.calibrate(sc.name, list(buckets), self.labels, timer, repeats=self.repeats, inert=inert_in_bucket,
                        runtime=runtime, session=session)
        dense = {b: statistics.median(e.dense_decode_per_token_s for k, e in table.entries.items()
                                      if k.split("|")[1] == b and e.samples > 0) for b in buckets}
        during = statistics.median(dense[b] / idle[b] for b in buckets)
        if sc.loaded and during < sc.min_slowdown:
            log.warning("LOAD CHECK: level '%s' slowed the dense model only x%.2f during calibration round %d "
                        "(minimum x%.2f)", sc.name, during, round_, sc.min_slowdown)
        return LevelCalibration(sc.name, round_, SPLITS[round_ % 2], table, telemetry, dense, start,
                                time.perf_counter() - started)
