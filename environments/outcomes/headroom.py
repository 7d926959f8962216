"""Per-prompt damage and the signals that might predict it, measured once per prompt and kept on disk.

Why: the headroom report (``reporting.headroom``) asks how much any per-prompt policy could gain at equal
compute, and how much of it each signal captures. That needs, per prompt: every action's outcome on the
dense greedy reference (``environments.outcomes.cache.measure_prompt``: log PPL ratio, token KL, and both
on the reference's two halves for split-half reliability), the probe features of the very prefill that
generated the reference (``environments.probe_features``), and the syntax features the state has today.
One JSON file per prompt, keyed like the outcome cache, so a long run resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from common.data import Prompt
from common.files import atomic_write_text
from environments.outcomes.cache import PromptOutcomes, digest, measure_prompt
from environments.probe_features import probe_features
from pruners import PruningAction

log = logging.getLogger(__name__)

VERSION = 1


@dataclass
class HeadroomRecord:
    prompt_id: str
    outcomes: PromptOutcomes
    probe: dict[str, float]          # environments.probe_features, from the reference's own prefill
    nlp: list[float]                 # nlp_analyzer.PromptFeatures.vector
    prompt_ids: list[int]
    ref_ids: list[int]               # the dense greedy reference the outcomes are scored on

    @classmethod
    def from_dict(cls, d: dict) -> "HeadroomRecord":
        return cls(**{**d, "outcomes": PromptOutcomes.from_dict(d["outcomes"])})


def record_path(folder: Path, settings: dict, prompt: Prompt) -> Path:
    return Path(folder) / f"{digest({**settings, 'headroom': VERSION, 'text': prompt.text})}.json"


def measure_record(env, analyzer, prompt: Prompt, actions: Sequence[PruningAction],
                   prompt_kl_tokens: int) -> HeadroomRecord:
    """One prompt: the dense reference and the probe features of its prefill (``env.prefill``: recorded by the
    reference generation itself when ``env`` was built with ``record_prefill``), then every action scored on that
    reference."""
    engine = env.engine
    engine.restore()
    ref = env.reference(prompt)
    features = probe_features(env.prefill(prompt), ref.prompt_ids, engine, actions)
    outcomes = measure_prompt(env, prompt, actions, prompt_kl_tokens)
    nlp = analyzer.analyze(prompt.text, tokenizer=env.tokenizer).vector
    return HeadroomRecord(prompt.id, outcomes, features.as_dict(), [float(v) for v in nlp],
                          ref.prompt_ids.tolist(), ref.ref_ids.tolist())


def measure_headroom(env, analyzer, prompts: Sequence[Prompt], actions: Sequence[PruningAction], folder: Path,
                     settings: dict, prompt_kl_tokens: int, deadline: float | None = None,
                     fanout: Callable[[Sequence[Prompt]], Iterator[dict]] | None = None) -> list[HeadroomRecord | None]:
    """Records of the prompts, in their order, measuring only those not on disk (an interrupted run resumes).
    ``fanout`` measures the missing prompts elsewhere (``environments.outcomes.fanout.ray_headroom``) and yields
    their records as dicts in any order; they are written here either way. After ``deadline``
    (``time.monotonic()``) nothing more is measured: the prompts left get None."""
    records: dict[str, HeadroomRecord] = {}
    todo = []
    for prompt in prompts:
        path = record_path(folder, settings, prompt)
        if path.is_file():
            records[prompt.id] = HeadroomRecord.from_dict(json.loads(path.read_text()))
        else:
            todo.append(prompt)

    def local() -> Iterator[dict]:
        for prompt in todo:
            if deadline is not None and time.monotonic() > deadline:
                return
            yield asdict(measure_record(env, analyzer, prompt, actions, prompt_kl_tokens))

    by_id = {p.id: p for p in todo}
    measured = fanout(todo) if fanout is not None and todo else local()
    for data in tqdm(measured, total=len(todo), desc="headroom prompts", unit="prompt", disable=not todo):
        record = HeadroomRecord.from_dict(data)
        atomic_write_text(record_path(folder, settings, by_id[record.prompt_id]), json.dumps(data))
        records[record.prompt_id] = record
        if deadline is not None and time.monotonic() > deadline:
            break
    return [records.get(p.id) for p in prompts]
