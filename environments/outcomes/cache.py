"""Every (prompt, action) quality outcome, measured once and kept on disk.

Why: quality does not depend on the machine's load, only on the model, the engine's settings, the
reference and the prompt, so measuring it once per prompt and action (instead of a dense and a
pruned forward every episode) lets the offline environment run 10,000 episodes in seconds. One JSON
file per prompt, named by a digest of everything the numbers depend on, so a changed setting never
reads a stale outcome, an interrupted precompute resumes, and a grown action space measures only
the new actions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from common.config import EngineConfig, RunConfig
from common.data import Prompt
from common.files import atomic_write_text
from environments.outcomes.quality import mean_kl, ppl_ratio, token_kl, token_nll
from environments.probe_features import VERSION as PROBE_VERSION, probe_features, probed
from pruners import PruningAction

log = logging.getLogger(__name__)

SCHEMA = 1


@dataclass
class ActionQuality:
    """One action on one prompt, against the dense model on the same reference."""
    ppl_ratio: float                  # teacher-forced PPL on the reference, pruned / dense
    kl: float                         # mean token KL(dense || pruned) on the reference
    prompt_kl: float | None           # the same on the prompt's last positions (None: prompt too short)
    half_log_ratio: tuple[float, float]   # log PPL ratio on the first and the second half of the reference
    inert: bool                       # nothing removed on this prompt (none; KV pruning of a short prompt)
    half_kl: tuple[float, float] | None = None   # mean token KL on the two halves (reliability of KL as the
                                                 # damage measure; None in caches written before it existed)
    # KL(dense || pruned) and pruned - dense NLL at each reference position, from the same scores as the means
    # (a dense look-ahead of K tokens reads the first K, its decision the rest; None in caches written before them)
    token_kl: list[float] | None = None
    token_nll_diff: list[float] | None = None


@dataclass
class PromptOutcomes:
    prompt_id: str
    context_tokens: int               # prompt tokens the model sees (after any truncation)
    reference_tokens: int             # tokens scored, and generated when timed
    reference_source: str             # "dataset" or "dense_greedy"
    truncated: bool
    actions: dict[str, ActionQuality] = field(default_factory=dict)
    # environments.probe_features of the reference generation's dense prefill, by name (None: not asked for;
    # --state-features ...+probe asks), and the version of their definition they were computed with
    probe: dict[str, float] | None = None
    probe_version: int | None = None

    def has_probe(self, actions: Sequence[PruningAction]) -> bool:
        """Probe features of today's definition, with an injected error for every probed action of ``actions``."""
        return (self.probe is not None and self.probe_version == PROBE_VERSION
                and all(f"inject.{a.label}" in self.probe for a in probed(actions)))

    def has_positions(self, labels: Sequence[str]) -> bool:
        """Per-position KL and NLL difference for every action of ``labels`` (what a look-ahead state reads)."""
        return all(label in self.actions and self.actions[label].token_kl is not None for label in labels)

    def without_positionless(self) -> "PromptOutcomes":
        """A copy keeping only the actions measured with per-position scores (the rest are measured again)."""
        kept = {k: q for k, q in self.actions.items() if q.token_kl is not None}
        return replace(self, actions=kept)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptOutcomes":
        actions = {k: ActionQuality(**{**v, "half_log_ratio": tuple(v["half_log_ratio"]),
                                       "half_kl": tuple(v["half_kl"]) if v.get("half_kl") else None})
                   for k, v in d["actions"].items()}
        return cls(**{k: v for k, v in d.items() if k != "actions"}, actions=actions)


def engine_settings(cfg: RunConfig, model_name: str, model_source: str) -> dict:
    """Everything an outcome depends on besides the prompt."""
    return {"schema": SCHEMA, "model": model_name, "source": model_source, "engine": EngineConfig.of(cfg).to_dict(),
        "kv_min_tokens": cfg.env.long_prompt_tokens, "max_new_tokens": cfg.env.max_new_tokens,
        "min_reference_tokens": cfg.env.min_reference_tokens, "prompt_kl_tokens": cfg.offline.prompt_kl_tokens}


def digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class OutcomeCache:
    """Folder of <digest>.json files, one per (settings, prompt text, prompt reference)."""

    def __init__(self, folder: Path, settings: dict):
        self.folder, self.settings = Path(folder), settings

    def path(self, prompt: Prompt) -> Path:
        return self.folder / f"{digest({**self.settings, 'text': prompt.text, 'reference': prompt.reference})}.json"

    def load(self, prompt: Prompt) -> PromptOutcomes | None:
        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            return PromptOutcomes.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as err:
            log.warning("outcome cache file %s is unreadable (%s): measuring again", path, err)
            return None

    def store(self, prompt: Prompt, outcomes: PromptOutcomes) -> None:
        atomic_write_text(self.path(prompt), json.dumps(asdict(outcomes)))


def measure_prompt(env, prompt: Prompt, actions: Sequence[PruningAction], prompt_kl_tokens: int,
                   known: PromptOutcomes | None = None, probe: bool = False) -> PromptOutcomes:
    """Quality of every action on one prompt (those in `known` are kept): the same dense reference,
    dense scores and pruned scoring path as the live environment's step, plus KL on the prompt's last
    positions and the two halves of the reference for split-half reliability.

    ``probe``: also the probe features, from the dense prefill of the reference generation (no extra forward
    when the reference is generated here). Heads/FFN actions keep the units the environment's ``pruned_for``
    chooses (per request under ``--importance probe``)."""
    ref = env.reference(prompt)
    context, target = env.segment(prompt)
    dense = env.dense_scores(prompt, prompt_positions=prompt_kl_tokens)
    dense_nll = token_nll(dense, target)
    out = known or PromptOutcomes(prompt.id, int(context.numel()), int(target.numel()), ref.source, ref.truncated)
    half = max(1, target.numel() // 2)
    for action in actions:
        if action.label in out.actions:
            continue
        inert = env.inert(action, context.numel())
        with env.pruned_for(prompt, action):
            pruned = env.pruned_scores(context, target, dense, inert, prompt_positions=prompt_kl_tokens)
        # KV pruning happens after the prefill, so its prompt positions are the dense ones.
        pruned_prompt = pruned.prompt or dense.prompt
        diff = token_nll(pruned, target) - dense_nll
        second = diff[half:] if diff.numel() > half else diff[-1:]
        kl = token_kl(dense, pruned)
        second_kl = kl[half:] if kl.numel() > half else kl[-1:]
        out.actions[action.label] = ActionQuality(
            ppl_ratio=ppl_ratio(pruned, dense), kl=mean_kl(dense, pruned),
            prompt_kl=None if dense.prompt is None else mean_kl(dense.prompt, pruned_prompt),
            half_log_ratio=(float(diff[:half].mean()), float(second.mean())), inert=inert,
            half_kl=(float(kl[:half].mean()), float(second_kl.mean())),
            token_kl=kl.clamp_min(0.0).tolist(), token_nll_diff=diff.tolist())
    if probe and not out.has_probe(actions):
        env.engine.restore()
        out.probe = probe_features(env.prefill(prompt), ref.prompt_ids, env.engine, actions).as_dict()
        out.probe_version = PROBE_VERSION
    return out


def precompute(env, cache: OutcomeCache, prompts: Sequence[Prompt], actions: Sequence[PruningAction],
               prompt_kl_tokens: int, executor: str = "local", cfg: RunConfig | None = None,
               ray_address: str | None = None, probe: bool = False,
               lookahead: bool = False) -> dict[str, PromptOutcomes]:
    """prompt id -> outcomes for every prompt and action, measuring only what the cache lacks (``probe``:
    the probe features too; a cached prompt without them is completed, its actions' scores kept; ``lookahead``:
    per-position scores of every action, so actions cached before them are measured again, never read as zero).

    ``executor="ray"``: the prompts to measure run as independent tasks on Ray actors built from ``cfg``
    (``environments.outcomes.fanout``); the cache is written here either way."""
    labels = {a.label for a in actions}
    result: dict[str, PromptOutcomes] = {}
    todo = []
    for prompt in prompts:
        known = cache.load(prompt)
        if known is not None and lookahead and not known.has_positions(labels):
            known = known.without_positionless()
        if known is not None and labels <= set(known.actions) and (not probe or known.has_probe(actions)):
            result[prompt.id] = known
        else:
            todo.append((prompt, known))
    if todo:
        log.info("outcome cache: %d of %d prompts to measure (%d actions each) in %s",
                 len(todo), len(prompts), len(actions), cache.folder)
    if executor == "ray" and todo:
        from environments.outcomes.fanout import ray_measure
        measured = ray_measure(cfg, todo, actions, prompt_kl_tokens, ray_address, probe=probe)
    else:
        measured = ((prompt, measure_prompt(env, prompt, actions, prompt_kl_tokens, known, probe))
                    for prompt, known in todo)
    for prompt, outcomes in tqdm(measured, total=len(todo), desc="precompute outcomes", disable=not todo):
        bad = [a for a, q in outcomes.actions.items() if not (math.isfinite(q.ppl_ratio) and math.isfinite(q.kl))]
        if bad:
            raise FloatingPointError(f"prompt {prompt.id}: non-finite quality for {bad}")
        cache.store(prompt, outcomes)
        result[prompt.id] = outcomes
    return {p.id: result[p.id] for p in prompts}
