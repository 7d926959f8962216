"""Torch's thread count for a block of work, and the evidence the execution governor ranks the counts by.

Why the generations themselves (issue 25): under ``heavy`` (a spinning process per core) the governor's live check, a
16-token prefill and three steps per count, ranked the counts unlike the generations it decided for (a 512-token
prompt, 31 steps): in one run it chose 1 thread in 4 of 9 rounds while fixed 2 threads beat fixed 1 thread in 8 of 9
(fp32 medians 51.0 against 67.6 ms per token). So one decode step in ``probe_every`` of every generation on the
governor's decoder runs on another thread count (``ThreadObservations.probes``), every step is timed, and once each
count has steps in a state the governor runs the count with the fastest median step there; the live check decides
only the first generation in a state. Probing inside the generations compares the counts in the regime that is served
(its context length, its moment's load) at the cost of one step in ``probe_every``, where exploring with whole
generations would spend whole generations on the slower count.

A step's seconds are divided by the bytes it reads (its weights as pruned and quantized, its KV cache:
``runtime.floor.step_bytes``), so generations of different actions and prompt lengths rank the counts together.
"""
from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

MIN_STEPS = 3       # a count with fewer timed steps in a state is not ranked yet


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block on ``threads`` torch threads, then restore the count it found."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Generation:
    """One observed generation: its steps' seconds per byte read, per thread count."""
    steps: dict[int, list[float]] = field(default_factory=dict)

    def add(self, threads: int, s_per_byte: float) -> None:
        self.steps.setdefault(threads, []).append(s_per_byte)


class ThreadObservations:
    """Per machine state, the last ``window`` observed generations, however old: each has steps on every count, so
    the ranking follows a change within the state in a few generations. An age limit (the live check's 120 s) left a
    governor that decides every two minutes (the bench's rounds under ``heavy``) on the check in most decisions."""

    def __init__(self, window: int = 5, probe_every: int = 8) -> None:
        if window < 1 or probe_every == 1 or probe_every < 0:
            raise ValueError("window must be >= 1 and probe_every 0 (no probing) or >= 2")
        self.window, self.probe_every = window, probe_every
        self._runs: dict[str, deque[Generation]] = {}

    def open(self, state: str) -> Generation:
        """A new generation in ``state``: the caller adds each step's thread count and seconds per byte."""
        run = Generation()
        self._runs.setdefault(state, deque(maxlen=self.window)).append(run)
        return run

    def probes(self, threads: int, candidates: tuple[int, ...], steps: int) -> dict[int, int]:
        """Which of a generation's ``steps`` on ``threads`` run on another count (step index -> count): every
        ``probe_every``-th from mid-period, the other candidates in turn."""
        others = [t for t in candidates if t != threads]
        if not others or not self.probe_every:
            return {}
        return {i: others[n % len(others)] for n, i in enumerate(range(self.probe_every // 2, steps,
                                                                              self.probe_every))}

    def figures(self, state: str) -> dict[int, float]:
        """Seconds per byte per count with at least ``MIN_STEPS`` steps in the state's window: their median."""
        pooled: dict[int, list[float]] = {}
        for run in self._runs.get(state, ()):
            for threads, steps in run.steps.items():
                pooled.setdefault(threads, []).extend(steps)
        return {t: statistics.median(steps) for t, steps in pooled.items() if len(steps) >= MIN_STEPS}

    def choose(self, state: str, candidates: tuple[int, ...]) -> int | None:
        """The count with the fastest median step in ``state`` (a tie keeps more threads); None until every
        candidate has steps there (the caller's live check decides)."""
        figures = self.figures(state)
        if not all(t in figures for t in candidates):
            return None
        return min(candidates, key=lambda t: (figures[t], -t))
