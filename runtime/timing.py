"""The one speed-timing protocol behind every speed figure: latency tables, the baselines sweep, the eval probe.

Why one: a speedup is a ratio of two noisy times on a possibly shared machine; three call sites that
timed it three ways (mean vs median steps, warm-up or not, dense-only warm-up) gave figures that did
not compare. The protocol:

1. **A run** is a greedy generation of a fixed number of new tokens with EOS ignored
   (``generation.generate(..., ignore_eos=True)``), under the execution governor's setting, decided
   once per session (``runtime.governor``; never a count it explores), and recorded with the timings.
2. **Per run**: the prefill time, and the decode time per token as the median of its decode steps
   (a step preempted on a shared machine does not move it).
3. **Warm-up**: every side (dense, each action, each policy) gets one untimed run before its first
   timed one, so first-use costs (allocations, lazily built views, a compiled graph's capture)
   never enter a timing.
4. **Comparisons are interleaved**, dense then pruned, pair after pair (A B A B), so load that
   drifts during the session hits both sides alike.
5. **Summaries are medians** over a side's runs; a speedup is median(dense) / median(pruned), for
   prefill and decode separately.

    session = TimingSession(governor.govern(explore=False))
    pair = session.compare(lambda _: RunTiming.of(generate(model, ids, 16)), lambda _: pruned_run(action),
                           range(3), pruned_side=action.label)
    pair.decode_speedup, pair.pruned.decode_per_token_s, session.runtime
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:   # torch-free at run time: latency tables load where torch is not imported
    from runtime.generation import GenerationResult
    from runtime.governor import RuntimeSetting

DENSE = "dense"
T = TypeVar("T")


def pass_times(fn: Callable[[], object], passes: int) -> list[float]:
    """Seconds of ``passes`` calls of ``fn`` after one untimed call (the protocol's warm-up, rule 3) — for
    timings below a whole run: a floor's matrix pass, an engine switch."""
    fn()
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


@dataclass(frozen=True)
class RunTiming:
    prefill_s: float
    decode_per_token_s: float      # median decode step of the run

    @classmethod
    def of(cls, result: GenerationResult) -> "RunTiming":
        return cls(result.prefill_s, result.median_step_s)


@dataclass
class SideTimings:
    """All timed runs of one side; its figures are medians."""
    runs: list[RunTiming] = field(default_factory=list)

    @property
    def prefill_s(self) -> float:
        return statistics.median(r.prefill_s for r in self.runs)

    @property
    def decode_per_token_s(self) -> float:
        return statistics.median(r.decode_per_token_s for r in self.runs)

    def latency(self, new_tokens: int) -> float:
        """One request: prefill plus (new_tokens - 1) decode steps (the first token comes from prefill)."""
        return self.prefill_s + (new_tokens - 1) * self.decode_per_token_s


@dataclass
class Comparison:
    dense: SideTimings
    pruned: SideTimings

    @property
    def decode_speedup(self) -> float:
        return self.dense.decode_per_token_s / self.pruned.decode_per_token_s

    @property
    def prefill_speedup(self) -> float:
        return self.dense.prefill_s / self.pruned.prefill_s


class TimingSession:
    """Applies the protocol's warm-up rule over one block of timings and carries its runtime setting."""

    def __init__(self, setting: RuntimeSetting | None = None) -> None:
        self.setting = setting
        self._warm: set[Hashable] = set()

    @property
    def runtime(self) -> str | None:
        return self.setting.label if self.setting is not None else None

    def time(self, side: Hashable, run: Callable[[], RunTiming]) -> RunTiming:
        """One timed run of ``side``, after its untimed warm-up if this session has not run it yet."""
        if side not in self._warm:
            run()
            self._warm.add(side)
        return run()

    def repeat(self, side: Hashable, run: Callable[[], RunTiming], repeats: int) -> SideTimings:
        return SideTimings([self.time(side, run) for _ in range(repeats)])

    def compare(self, dense: Callable[[T], RunTiming], pruned: Callable[[T], RunTiming], inputs: Iterable[T],
                pruned_side: Hashable = "pruned", dense_side: Hashable = DENSE) -> Comparison:
        """One interleaved (dense, pruned) pair per input, in order (``range(n)`` for n pairs on one input)."""
        out = Comparison(SideTimings(), SideTimings())
        for x in inputs:
            out.dense.runs.append(self.time(dense_side, lambda: dense(x)))
            out.pruned.runs.append(self.time(pruned_side, lambda: pruned(x)))
        return out
