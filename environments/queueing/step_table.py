"""Measured cost of one scheduler iteration: a decode step per (action, batch size, context bucket), a
prefill per (action, prompt length).

Why a table: the slack policy must predict a step's time in well under a millisecond, and the queueing
simulator must replay the server's timing without a model; both read the same numbers, which
``serving.step_timing`` measures on the machine (torch-free here, so the simulator needs no model).
"""
from __future__ import annotations

import bisect
import json
from common.files import atomic_write_text, strict_json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StepTable:
    """``decode_s[label][i][j]``: one step of a batch of ``batches[i]`` rows whose longest context is in
    bucket ``contexts[j]``; ``prefill_s[label][j]``: one prompt of ``contexts[j]`` tokens at batch 1."""
    actions: tuple[str, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    decode_s: dict[str, list[list[float]]]
    prefill_s: dict[str, list[float]]
    meta: dict = field(default_factory=dict)   # model, threads, when, what else ran

    def __post_init__(self) -> None:
        for label in self.actions:
            rows = self.decode_s.get(label)
            if rows is None or len(rows) != len(self.batches) or any(len(r) != len(self.contexts) for r in rows):
                raise ValueError(f"step table: action {label} lacks a batch x context grid "
                                 f"({len(self.batches)} x {len(self.contexts)})")
            if len(self.prefill_s.get(label, ())) != len(self.contexts):
                raise ValueError(f"step table: action {label} lacks a prefill time per context bucket")

    def bucket(self, context: int) -> int:
        """Index of the smallest bucket holding ``context`` tokens (the largest beyond the grid)."""
        return min(bisect.bisect_left(self.contexts, context), len(self.contexts) - 1)

    def step_s(self, label: str, batch: int, context: int) -> float:
        """Predicted decode step; linear between measured batch sizes, the largest one's per-row cost beyond."""
        column = self.bucket(context)
        times = [row[column] for row in self.decode_s[label]]
        if batch <= self.batches[0]:
            return times[0]
        i = bisect.bisect_left(self.batches, batch)
        if i == len(self.batches):
            return times[-1] * batch / self.batches[-1]
        lo, hi = self.batches[i - 1], self.batches[i]
        share = (batch - lo) / (hi - lo)
        return times[i - 1] + share * (times[i] - times[i - 1])

    def prefill_time(self, label: str, prompt_tokens: int) -> float:
        """Predicted prefill of one prompt: linear in its length through the measured buckets."""
        points = [(0, 0.0), *zip(self.contexts, self.prefill_s[label])]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if prompt_tokens <= x1:
                return y0 + (prompt_tokens - x0) * (y1 - y0) / (x1 - x0)
        (x0, y0), (x1, y1) = points[-2], points[-1]
        return y1 + (prompt_tokens - x1) * (y1 - y0) / (x1 - x0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StepTable":
        return cls(actions=tuple(data["actions"]), batches=tuple(data["batches"]), contexts=tuple(data["contexts"]),
                   decode_s=data["decode_s"], prefill_s=data["prefill_s"], meta=data.get("meta", {}))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, strict_json(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path, flag: str = "--step-table") -> "StepTable":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{flag} {path} not found: pass a step table a server or "
                                    "bench/serve_study.py wrote") from err
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{flag} {path} is not a step table ({err}): measure one again") from err
