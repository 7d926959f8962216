"""A short dense look-ahead as a per-prompt damage signal, the comparison point for the prefill probe (issue 27).

Why: the prefill-probe features rank per-prompt damage only weakly. The obvious stronger (and dearer) signal
is to generate the first K tokens densely, score them once with the pruned model, and decide from the
action's KL on them. A fair test must not let the look-ahead see what it predicts, so its target is the
reference's log PPL ratio on the positions after K only.

Per headroom record (``environments.outcomes.headroom``: the prompt and its dense greedy reference) and action:
one dense and one pruned teacher-forced forward over prompt + reference, kept as per-position KL(dense ||
pruned) and pruned - dense NLL, so every K is a slice. Position j is the distribution after the prompt and
reference[:j]: positions < K are exactly what a K-token dense look-ahead and one pruned forward over prompt +
its tokens give. One JSON file per prompt in a sidecar folder, keyed by the record's own file name.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common.files import atomic_write_text, strict_json
from environments.outcomes.headroom import HeadroomRecord
from environments.outcomes.quality import score_reference, token_kl, token_nll
from pruners import PruningAction

log = logging.getLogger(__name__)

VERSION = 1
KS = (2, 4, 8)


@dataclass
class LookaheadRecord:
    prompt_id: str
    kl: dict[str, list[float]]          # action label -> KL(dense || pruned) at each reference position, nats
    nll_diff: dict[str, list[float]]    # action label -> pruned - dense NLL of each reference token

    def _check(self, label: str, k: int) -> None:
        n = len(self.kl[label])
        if not 1 <= k < n:
            raise ValueError(f"look-ahead of {k} tokens must be between 1 and {n - 1} "
                             f"(the reference has {n} tokens and the target is the part after the look-ahead)")

    def lookahead_kl(self, label: str, k: int) -> float:
        """Mean KL over the first ``k`` reference positions: what a ``k``-token dense look-ahead measures."""
        self._check(label, k)
        return sum(self.kl[label][:k]) / k

    def after(self, label: str, start: int = 0, measure: str = "nll_diff") -> float:
        """Mean of ``measure`` ("nll_diff": the log PPL ratio pruned / dense, or "kl") over the reference
        positions from ``start`` on (0: the whole reference; else the target a ``start``-token look-ahead
        predicts)."""
        rest = self._tail(label, start, measure)
        return sum(rest) / len(rest)

    def halves(self, label: str, start: int = 0, measure: str = "nll_diff") -> tuple[float, float]:
        """Mean of ``measure`` over the first and the second half of the positions from ``start`` on (for
        split-half reliability)."""
        rest = self._tail(label, start, measure)
        half = max(1, len(rest) // 2)
        second = rest[half:] or rest[-1:]
        return sum(rest[:half]) / half, sum(second) / len(second)

    def _tail(self, label: str, start: int, measure: str) -> list[float]:
        if start:
            self._check(label, start)
        return getattr(self, measure)[label][start:]


@torch.inference_mode()
def measure_lookahead(model, engine, record: HeadroomRecord, actions: Sequence[PruningAction]) -> LookaheadRecord:
    """Per-position KL and NLL difference of every action on the record's reference (one dense forward, one
    pruned forward per action, scored as the headroom outcomes are: ``score_reference`` with the engine's KV
    pruner, so the full-reference log ratio equals the record's)."""
    prompt_ids, ref_ids = torch.tensor(record.prompt_ids), torch.tensor(record.ref_ids)
    engine.restore()
    dense = score_reference(model, prompt_ids, ref_ids)
    dense_nll = token_nll(dense, ref_ids)
    kl, diff = {}, {}
    for action in actions:
        with engine.pruned(action):
            pruned = score_reference(model, prompt_ids, ref_ids, kv=engine.kv_pruner)
        kl[action.label] = token_kl(dense, pruned).clamp_min(0.0).tolist()
        diff[action.label] = (token_nll(pruned, ref_ids) - dense_nll).tolist()
    return LookaheadRecord(record.prompt_id, kl, diff)


def sidecar_path(folder: Path, record_file: Path) -> Path:
    return Path(folder) / f"v{VERSION}-{Path(record_file).name}"


def measure_all(model, engine, records: Sequence[tuple[Path, HeadroomRecord]], actions: Sequence[PruningAction],
                folder: Path) -> list[LookaheadRecord]:
    """Look-ahead records of ``(record file, record)`` pairs in order, measuring only those not in ``folder``
    (or lacking an action), so an interrupted run resumes."""
    labels = {a.label for a in actions}
    out: dict[str, LookaheadRecord] = {}
    todo = []
    for path, record in records:
        side = sidecar_path(folder, path)
        if side.is_file():
            known = LookaheadRecord(**json.loads(side.read_text()))
            if labels <= set(known.kl):
                out[record.prompt_id] = known
                continue
        todo.append((side, record))
    for side, record in tqdm(todo, desc="look-ahead prompts", unit="prompt", disable=not todo):
        measured = measure_lookahead(model, engine, record, actions)
        atomic_write_text(side, strict_json(asdict(measured)))
        out[record.prompt_id] = measured
    return [out[record.prompt_id] for _, record in records]
