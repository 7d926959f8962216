"""Per-action latency, measured interleaved against the dense model under the current load.

One timing per episode is noise; a table of interleaved (dense, pruned) medians per load
scenario and prompt-length bucket gives a speedup that noise cannot fake and makes rewards
reproducible for a fixed table.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from tqdm import tqdm

from runtime.timing import RunTiming, TimingSession

log = logging.getLogger(__name__)


@dataclass
class LatencyEntry:
    """Medians of interleaved timings of one action against the dense model."""
    prefill_s: float
    decode_per_token_s: float
    dense_prefill_s: float
    dense_decode_per_token_s: float
    samples: int
    scaled_from: str | None = None     # "idle x 1.72/1.80": the reference scenario's entry times the dense slowdown
    runtime: str | None = None         # the runtime it was timed under (runtime.governor), e.g. "stock/2t/eager"

    def latency(self, new_tokens: int) -> float:
        return self.prefill_s + new_tokens * self.decode_per_token_s

    def dense_latency(self, new_tokens: int) -> float:
        return self.dense_prefill_s + new_tokens * self.dense_decode_per_token_s

    def speedup(self, new_tokens: int) -> float:
        return self.dense_latency(new_tokens) / self.latency(new_tokens)


Timer = Callable[[str, str], tuple[float, float]]   # (action label, bucket) -> (prefill_s, decode_per_token_s)


@dataclass
class LatencyTable:
    entries: dict[str, LatencyEntry] = field(default_factory=dict)   # key "scenario|bucket|action"

    @staticmethod
    def key(scenario: str, bucket: str, action: str) -> str:
        return f"{scenario}|{bucket}|{action}"

    def has(self, scenario: str) -> bool:
        return any(k.startswith(scenario + "|") for k in self.entries)

    def get(self, scenario: str, bucket: str, action: str) -> LatencyEntry:
        try:
            return self.entries[self.key(scenario, bucket, action)]
        except KeyError as err:
            raise KeyError(f"no latency calibrated for action {action} ({bucket} prompts) "
                           f"under scenario '{scenario}'") from err

    def calibrate(self, scenario: str, buckets: list[str], actions: list[str], time_one: Timer,
                  repeats: int = 2, inert: Callable[[str, str], bool] = lambda bucket, action: False,
                  runtime: str | None = None, session: TimingSession | None = None) -> None:
        """Time dense and each action alternately (A B A B) and store per-action medians, by the
        protocol of ``runtime.timing`` (each side warmed up once per ``session``: a fresh one unless
        given, so several tables measured in one process can share their warm-ups); ``runtime`` labels
        every entry.

        Entries are committed together at the end, so an interrupted calibration leaves none.
        An `inert(bucket, action)` action does nothing in that bucket (KV pruning of short prompts):
        it gets a copy of the `none` entry (samples=0), so its reward equals the dense model's exactly.
        """
        pairs = [(b, a) for b in buckets for a in actions]
        fresh: dict[str, LatencyEntry] = {}
        session = session or TimingSession()
        for bucket, action in tqdm(pairs, desc=f"latency table [{scenario}]", leave=False):
            if inert(bucket, action) and self.key(scenario, bucket, "none") in fresh:
                fresh[self.key(scenario, bucket, action)] = replace(fresh[self.key(scenario, bucket, "none")], samples=0)
                continue
            pair = session.compare(lambda _: RunTiming(*time_one("none", bucket)),
                                   lambda _: RunTiming(*time_one(action, bucket)), range(repeats),
                                   pruned_side=(bucket, action), dense_side=(bucket, "none"))
            fresh[self.key(scenario, bucket, action)] = LatencyEntry(
                prefill_s=pair.pruned.prefill_s, decode_per_token_s=pair.pruned.decode_per_token_s,
                dense_prefill_s=pair.dense.prefill_s, dense_decode_per_token_s=pair.dense.decode_per_token_s,
                samples=repeats, runtime=runtime)
        self.entries.update(fresh)
        log.info("latency table calibrated for scenario '%s': %d entries", scenario, len(pairs))

    def calibrate_scaled(self, reference: str, scenario: str, buckets: list[str],
                         time_dense: Callable[[str], tuple[float, float]], repeats: int = 6,
                         runtime: str | None = None) -> None:
        """Entries of `scenario` = `reference`'s entries with prefill and decode times multiplied by
        the dense model's slowdown, measured now as the median of `repeats` dense runs per bucket.

        Why: under CPU contention a 3-pair interleaved timing per action is noise (on 2 busy cores
        the same action measured 0.77x-1.30x in two calibrations), while the dense slowdown pooled
        over several runs is stable. Structured pruning removes a fixed share of the work, so the
        idle speedups carry over and load enters through absolute latency against the budget.
        """
        missing = [b for b in buckets if self.key(reference, b, "none") not in self.entries]
        if missing:
            raise KeyError(f"scenario '{reference}' has no dense entry for {missing}: calibrate it first")
        fresh: dict[str, LatencyEntry] = {}
        session = TimingSession()
        for bucket in tqdm(buckets, desc=f"latency table [{scenario}, scaled from {reference}]", leave=False):
            dense = session.repeat(bucket, lambda: RunTiming(*time_dense(bucket)), repeats)
            base = self.entries[self.key(reference, bucket, "none")]
            prefill = dense.prefill_s / base.dense_prefill_s
            decode = dense.decode_per_token_s / base.dense_decode_per_token_s
            prefix = f"{reference}|{bucket}|"
            for key, entry in self.entries.items():
                if key.startswith(prefix):
                    fresh[self.key(scenario, bucket, key[len(prefix):])] = LatencyEntry(
                        prefill_s=entry.prefill_s * prefill, decode_per_token_s=entry.decode_per_token_s * decode,
                        dense_prefill_s=entry.dense_prefill_s * prefill,
                        dense_decode_per_token_s=entry.dense_decode_per_token_s * decode,
                        samples=repeats, scaled_from=f"{reference} x {prefill:.2f}/{decode:.2f}", runtime=runtime)
        self.entries.update(fresh)
        log.info("latency table for scenario '%s' scaled from '%s': %d entries", scenario, reference, len(fresh))

    def to_dict(self) -> dict:
        return {k: asdict(v) for k, v in self.entries.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        return cls({k: LatencyEntry(**v) for k, v in d.items()})
