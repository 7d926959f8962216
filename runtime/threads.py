"""Torch's thread count for a block of work, and the evidence the execution governor ranks the counts by.

Why whole generations (issue 25): under ``heavy`` (a spinning process per core) two shorter measures ranked the counts
unlike the generations they decided for. The live check (a 16-token prefill, three steps per count) chose 1 thread in
4 of 9 rounds while fixed 2 threads beat fixed 1 thread in 8 of 9. Single probe steps on the other count inside a
generation (one step in eight) timed 1 thread within 4 % of 2 threads (0.169 against 0.162 s/GB over a 36-round run)
while fixed 2-thread generations ran 17 % faster than fixed 1-thread ones in the same rounds; the governor then ran 1
thread in 14 of 36 rounds. A step on a count the process has just switched to is not a step of a generation on that
count. So the counts are ranked on whole generations on each: a generation's figure is its median step (the tool's
ms/token) in seconds per byte read (its weights as pruned and quantized, its KV cache: ``runtime.floor.step_bytes``,
so generations of different actions and prompt lengths rank the counts together), and a count's figure the median of
its last ``window`` generations' figures in the state.

Exploring spends whole generations on a count the governor thinks slower, so how often it does is priced: a count
``excess`` slower than the best runs once in ``max(explore_min, ceil(excess / explore_cost))`` generations, which
spends at most ``explore_cost`` of the decode time on exploring (``excess / interval``) whatever the gap, yet revisits
a close count every few generations, where a misranking is likeliest and the ranking must follow the load.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

MIN_STEPS = 3       # a generation with fewer timed steps does not rank its count


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block on ``threads`` torch threads, then restore the count it found."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fastest(figures: dict[int, float]) -> int:
    """The count with the lowest figure; a tie keeps more threads."""
    return min(figures, key=lambda t: (figures[t], -t))


@dataclass
class Generation:
    """One observed generation on one thread count: its steps' seconds per byte read, and its place among its
    state's generations (how long ago its count last ran)."""
    threads: int
    index: int
    steps: list[float] = field(default_factory=list)

    def add(self, s_per_byte: float) -> None:
        self.steps.append(s_per_byte)

    @property
    def figure(self) -> float | None:
        """Its median step, per byte; None with fewer than ``MIN_STEPS`` steps."""
        return statistics.median(self.steps) if len(self.steps) >= MIN_STEPS else None


@dataclass
class _State:
    """One machine state's evidence: the last generations per count, and how many it has opened."""
    runs: dict[int, deque[Generation]] = field(default_factory=dict)
    opened: int = 0


class ThreadObservations:
    """Per machine state, each count's last ``window`` observed generations, however old (an age limit, the live
    check's 120 s, left a governor that decides every two minutes, the bench's rounds under ``heavy``, on the check in
    most decisions), and the exploration schedule over them."""

    def __init__(self, window: int = 5, explore_cost: float = 0.025, explore_min: int = 4) -> None:
        if window < 1 or explore_cost < 0 or explore_min < 2:
            raise ValueError("window must be >= 1, explore_cost >= 0 (0: no exploring) and explore_min >= 2")
        self.window, self.explore_cost, self.explore_min = window, explore_cost, explore_min
        self._states: dict[str, _State] = {}

    def open(self, state: str, threads: int) -> Generation:
        """A new generation in ``state`` on ``threads``: the caller adds each step's seconds per byte."""
        seen = self._states.setdefault(state, _State())
        run = Generation(threads, seen.opened)
        seen.runs.setdefault(threads, deque(maxlen=self.window)).append(run)
        seen.opened += 1
        return run

    def generations(self, state: str) -> dict[int, int]:
        """How many of each count's generations the state's window holds (ranked or not)."""
        seen = self._states.get(state)
        return {t: len(runs) for t, runs in seen.runs.items()} if seen else {}

    def figures(self, state: str) -> dict[int, float]:
        """Seconds per byte per count: the median of its window's generation figures."""
        seen = self._states.get(state)
        out: dict[int, float] = {}
        for threads, runs in (seen.runs.items() if seen else ()):
            values = [f for f in (run.figure for run in runs) if f is not None]
            if values:
                out[threads] = statistics.median(values)
        return out

    def interval(self, excess: float) -> int:
        """Generations between two on a count ``excess`` (0.2: 20 %) slower than the best."""
        return max(self.explore_min, math.ceil(excess / self.explore_cost))

    def choose(self, state: str, candidates: tuple[int, ...], explore: bool = True) -> tuple[int, str] | None:
        """(threads, basis) for the next generation in ``state``: "explore" for a count that is due (one with no
        figure yet at once, else after ``interval`` generations since it last ran; the most overdue first), else
        "observed", the count with the fastest figure (a tie keeps more threads). None where no candidate has a figure,
        or where ``explore`` is off and one lacks a figure: the caller's live check decides."""
        figures = {t: f for t, f in self.figures(state).items() if t in candidates}
        if not figures or (not explore and len(figures) < len(candidates)):
            return None
        best = fastest(figures)
        if explore and self.explore_cost > 0:
            seen = self._states[state]
            last = {t: runs[-1].index for t, runs in seen.runs.items()}
            due = {t: (seen.opened - last.get(t, -math.inf)) / (
                self.interval(figures[t] / figures[best] - 1.0) if t in figures else 1)
                for t in candidates if t != best}
            overdue = [t for t, waited in due.items() if waited >= 1]
            if overdue:
                return max(overdue, key=lambda t: (due[t], t)), "explore"
        return best, "observed"
