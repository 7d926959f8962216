"""Offline environment: each episode samples (prompt, level, calibration, telemetry) and looks the outcome up.

Why: a live episode costs a dense and a pruned forward plus a generation whose timing the reward
ignores (~2.5 s on SmolLM2), so a run saw each prompt a few times under one calibration. Here the
quality of every (prompt, action) comes from the outcome cache and the speed of every (level,
calibration, action) from a measured latency table, so the reward matrix of every cell is computed
once with the live environment's own rules (``table_speed``, ``idle_dense_latency``,
``reward_terms``: a test checks offline == live on the same inputs) and training runs 10,000
episodes in seconds. The state is the live one: the telemetry read during that calibration and
the prompt's features.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from common import hub
from common.config import RewardConfig
from common.data import Prompt
from common.files import atomic_write_text
from environments.live import idle_dense_latency, table_speed
from environments.latency_calibration import CalibrationSet, Calibrator, LevelCalibration
from machine.load_signals import BASIC, hardware_feature_names
from environments.outcomes.cache import OutcomeCache, PromptOutcomes, digest, engine_settings, precompute
from environments.records import Outcome
from environments.reward import constrained_parts, effective_budget, reward_terms
from environments.probe_features import state_names
from environments.lookahead_state import response_quality, check_positions, lookahead_features, lookahead_speed
from environments.state import lookahead_labels, state_feature_names, state_vector
from common.config import uses_lookahead, uses_probe
from pruners import PruningAction
from machine.replay import RecordedHardware
from machine.telemetry import HardwareState

log = logging.getLogger(__name__)

ON_BATTERY_SLOT = HardwareState.FEATURE_NAMES.index("on_battery")


@dataclass
class OfflineData:
    """What an offline run reads: outcomes per prompt, the calibration set, prompt features."""
    prompts: list[Prompt]
    outcomes: dict[str, PromptOutcomes]
    calibrations: CalibrationSet
    features: dict[str, object]          # prompt id -> nlp_analyzer.PromptFeatures
    selection: dict | None = None        # --importance probe: the per-request selection cost measured (selection_cost)

    @classmethod
    def from_record(cls, offline: dict) -> "OfflineData":
        """Back from a run's metrics.json ``offline`` block (no model needed: sweeps and re-fits read this)."""
        from nlp_analyzer import PromptFeatures
        prompts = [Prompt(p["id"], "", p["category"], None, p["source"]) for p in offline["prompts"]]
        return cls(prompts, {k: PromptOutcomes.from_dict(dict(v)) for k, v in offline["outcomes"].items()},
                   CalibrationSet.from_dict(offline["calibrations"]),
                   {k: PromptFeatures(**v) for k, v in offline["features"].items()}, offline.get("selection"))

    def merged(self, other: "OfflineData") -> "OfflineData":
        """This run's prompts with another's (a train and a test run of the same calibration set)."""
        if other.calibrations.settings != self.calibrations.settings:
            raise ValueError("the two runs were calibrated differently: merge runs of one calibration set")
        known = {p.id for p in self.prompts}
        return OfflineData(self.prompts + [p for p in other.prompts if p.id not in known],
                           {**other.outcomes, **self.outcomes}, self.calibrations, {**other.features, **self.features},
                           self.selection or other.selection)


def reads_lookahead(ablation: str) -> bool:
    """Whether a policy of this ablation reads the look-ahead part of its state (no_prompt zeroes it)."""
    return ablation != "no_prompt"


@dataclass
class Pricing:
    """The matrices one way of serving a request is scored by: [calibration, prompt, action] and [prompt, action].

    Two exist with a "...+lookahead" state: decided after the dense look-ahead (its cost charged, the whole
    response's quality), and without it; an arm is priced by what its decisions read."""
    reward: np.ndarray
    speedup: np.ndarray
    latency: np.ndarray
    objective: np.ndarray       # constrained objectives' parts
    constraint: np.ndarray
    ppl_ratio: np.ndarray
    kl: np.ndarray
    multiplier: float = 0.0     # a constrained objective's Lagrange multiplier: reward = objective - it x constraint


@dataclass(frozen=True)
class Cell:
    prompt: int          # index into env.prompts
    calibration: int     # index into env.cals
    telemetry: int       # index into that calibration's telemetry readings


class OfflineEnvironment:
    """Rewards of every (calibration, prompt, action) of one split, precomputed with the live rules.

    Separate from the live PruningEnvironment because it never generates: its outcomes are the live
    environment's own, looked up (tested equal), so thousands of episodes take seconds."""

    def __init__(self, data: OfflineData, prompt_ids: Sequence[str], split: str, action_labels: Sequence[str],
                 reward: RewardConfig, long_prompt_tokens: int, state_features: str = BASIC,
                 ablation: str = "none", levels: Sequence[str] | None = None, lookahead_tokens: int | None = None):
        """`levels`: only these load levels' calibrations (default: all of the split); `lookahead_tokens`: the
        look-ahead's K, required with a "...+lookahead" state (quality, speed and state then follow
        ``environments.lookahead_state``)."""
        by_id = {p.id: p for p in data.prompts}
        self.prompts = [by_id[i] for i in prompt_ids]
        self.outcomes = [data.outcomes[i] for i in prompt_ids]
        self.features = [data.features[i] for i in prompt_ids]
        self.cals: list[LevelCalibration] = [c for c in data.calibrations.select(split)
                                             if levels is None or c.level in levels]
        if not self.cals:
            raise ValueError(f"the calibration set has no {split} calibrations of levels {levels or 'any'}")
        self.calibration_set = data.calibrations
        self.levels = [lv for lv in data.calibrations.levels if any(c.level == lv for c in self.cals)]
        self.labels, self.reward_cfg, self.ablation = list(action_labels), reward, ablation
        self.long_prompt_tokens = long_prompt_tokens
        self.n_hardware = len(hardware_feature_names(state_features))
        self.probe_names: list[str] = []               # the probe features the state reads (none without +probe)
        self.probe: list[list[float]] = [[] for _ in self.outcomes]
        if uses_probe(state_features):
            self._read_probe()
        self.state_features = state_features
        self.lookahead_tokens = lookahead_tokens if uses_lookahead(state_features) else None
        self.lookahead: list[list[float]] = [[] for _ in self.outcomes]   # the state's look-ahead KLs (log)
        if uses_lookahead(state_features):
            self._read_lookahead()
        self._fill()

    @property
    def state_names(self) -> list[str]:
        """The names of the state's slots (what a checkpoint stores and check_compatible compares)."""
        return state_feature_names(self.state_features, self.probe_names, self.labels)

    def _read_lookahead(self) -> None:
        k = self.lookahead_tokens
        if k is None:
            raise ValueError(f"state features '{self.state_features}' need the look-ahead's length: pass "
                             "lookahead_tokens (--lookahead-tokens)")
        for prompt, outcome in zip(self.prompts, self.outcomes):
            check_positions(outcome, self.labels, k, prompt.id)
        self.lookahead = [lookahead_features(o, self.labels, k) for o in self.outcomes]

    def _read_probe(self) -> None:
        missing = [p.id for p, o in zip(self.prompts, self.outcomes) if o.probe is None]
        if missing:
            raise ValueError(f"{len(missing)} prompts' outcomes have no probe features (e.g. {missing[0]}): measure "
                             "them with --state-features ...+probe")
        self.probe_names = state_names(self.outcomes[0].probe, [PruningAction.parse(a) for a in self.labels])
        self.probe = [[o.probe[n] for n in self.probe_names] for o in self.outcomes]

    # ---- the reward matrix ------------------------------------------------------------------
    def bucket(self, outcome: PromptOutcomes) -> str:
        return "long" if outcome.context_tokens >= self.long_prompt_tokens else "short"

    def _fill(self) -> None:
        self.budget = np.full((len(self.cals), len(self.prompts)), np.inf)   # seconds allowed per (calibration, prompt)
        self.pricing = self._price(self.lookahead_tokens)
        # what reads no prompt feature runs no look-ahead: static actions, the level- and hardware-only arms, the
        # no-prompt ablation are priced without it (the same matrices when the state has no look-ahead)
        self.static_pricing = self.pricing if self.lookahead_tokens is None else self._price(None)
        if self.constrained:
            self.set_multiplier(0.0)

    def _price(self, k: int | None) -> Pricing:
        """Every cell's matrices, decided after a ``k``-token dense look-ahead (None: without one)."""
        shape = (len(self.cals), len(self.prompts), len(self.labels))
        quality = [[(q.ppl_ratio, q.kl) if k is None else response_quality(q, k)
                    for q in (o.actions[a] for a in self.labels)] for o in self.outcomes]
        quality = np.array(quality, dtype=np.float64).reshape(len(self.outcomes), len(self.labels), 2)
        out = Pricing(*(np.zeros(shape) for _ in range(5)), ppl_ratio=quality[..., 0], kl=quality[..., 1])
        for c, cal in enumerate(self.cals):
            table = self.calibration_set.merged_table(cal)
            on_battery = self.on_battery(cal)
            for p, outcome in enumerate(self.outcomes):
                bucket, n_new = self.bucket(outcome), outcome.reference_tokens
                idle_s = idle_dense_latency(table, bucket, n_new)
                budget = effective_budget(self.reward_cfg, idle_s, on_battery)
                self.budget[c, p] = np.inf if budget is None else budget
                forwards = [a for a in lookahead_labels(self.labels) if not outcome.actions[a].inert]
                for a, label in enumerate(self.labels):
                    q = outcome.actions[label]
                    speedup, latency = (table_speed(table, cal.level, bucket, label, n_new, q.inert) if k is None else
                                        lookahead_speed(table, cal.level, bucket, label, forwards, n_new, k, q.inert))
                    terms = reward_terms(self.reward_cfg, speedup=speedup, ppl_ratio=out.ppl_ratio[p, a],
                                         kl=out.kl[p, a], latency_s=latency, idle_dense_s=idle_s,
                                         on_battery=on_battery)
                    out.reward[c, p, a], out.speedup[c, p, a], out.latency[c, p, a] = terms.total, speedup, latency
                    if self.constrained:
                        out.objective[c, p, a], out.constraint[c, p, a] = constrained_parts(
                            self.reward_cfg, terms, budget_met=latency <= self.budget[c, p],
                            ppl_ratio=out.ppl_ratio[p, a])
        return out

    # the matrices of this environment's pricing (a static twin reads the look-ahead-free one)
    reward = property(lambda self: self.pricing.reward)
    speedup = property(lambda self: self.pricing.speedup)
    latency = property(lambda self: self.pricing.latency)
    objective = property(lambda self: self.pricing.objective)
    constraint = property(lambda self: self.pricing.constraint)
    ppl_ratio = property(lambda self: self.pricing.ppl_ratio)
    kl = property(lambda self: self.pricing.kl)
    multiplier = property(lambda self: self.pricing.multiplier)

    @property
    def has_lookahead(self) -> bool:
        return self.pricing is not self.static_pricing

    def static(self) -> OfflineEnvironment:
        """The same cells and states priced without the look-ahead: what an arm that reads no prompt feature
        (a static action, the per-level and rule arms, the no-prompt ablation) is fitted and scored on."""
        if not self.has_lookahead:
            return self
        other = copy.copy(self)
        other.pricing = self.static_pricing
        return other

    def with_ablation(self, ablation: str) -> OfflineEnvironment:
        """The same cells and reward matrices (shared, not copied), states with `ablation` applied: an
        ablation policy trains on exactly the main policy's data (priced without the look-ahead when the
        ablation removes it from the state)."""
        other = copy.copy(self.static() if not reads_lookahead(ablation) else self)
        other.ablation = ablation
        return other

    @property
    def constrained(self) -> bool:
        return self.reward_cfg.objective != "weighted"

    def set_multiplier(self, value: float) -> None:
        """Rewards of a constrained objective at this Lagrange multiplier (objective - value x constraint), in
        both pricings (shared by every twin of this environment)."""
        for pricing in {id(p): p for p in (self.pricing, self.static_pricing)}.values():
            pricing.multiplier = float(value)
            pricing.reward = pricing.objective - pricing.multiplier * pricing.constraint

    @staticmethod
    def on_battery(cal: LevelCalibration) -> bool:
        """Whether the machine ran on battery during this calibration (majority of its readings)."""
        flags = [v[ON_BATTERY_SLOT] for v in cal.telemetry]
        return bool(flags) and sum(flags) > len(flags) / 2

    # ---- cells and states -------------------------------------------------------------------
    def draw(self, rng: np.random.Generator, prompt: int) -> Cell:
        """A uniform level, a uniform calibration of it, a uniform telemetry reading of that calibration."""
        level = self.levels[int(rng.integers(len(self.levels)))]
        options = [i for i, c in enumerate(self.cals) if c.level == level]
        c = options[int(rng.integers(len(options)))]
        return Cell(prompt, c, int(rng.integers(len(self.cals[c].telemetry))))

    def hardware(self, cell: Cell) -> RecordedHardware:
        return RecordedHardware(self.cals[cell.calibration].telemetry[cell.telemetry][: self.n_hardware])

    def level(self, cell: Cell) -> str:
        return self.cals[cell.calibration].level

    def state(self, cell: Cell, ablation: str | None = None) -> np.ndarray:
        return state_vector(self.hardware(cell), self.features[cell.prompt], ablation or self.ablation,
                            self.probe[cell.prompt], self.lookahead[cell.prompt])

    def outcome(self, cell: Cell, action: int) -> Outcome:
        c, p = cell.calibration, cell.prompt
        return Outcome(action=self.labels[action], reward=float(self.reward[c, p, action]),
                       speedup=float(self.speedup[c, p, action]), ppl_ratio=float(self.ppl_ratio[p, action]),
                       kl=float(self.kl[p, action]), latency_s=float(self.latency[c, p, action]))

    def cells(self, draws: int, seed: int) -> list[Cell]:
        """Every (prompt, calibration) with `draws` seeded telemetry readings each (fitting and testing)."""
        rng = np.random.default_rng([seed, 31])
        return [Cell(p, c, int(rng.integers(len(cal.telemetry))))
                for c, cal in enumerate(self.cals) for p in range(len(self.prompts)) for _ in range(draws)]


Chooser = Callable[[Cell], int]     # a test cell -> action index (it builds whatever state it reads)


def evaluate_offline(env: OfflineEnvironment, arms: dict[str, list[Chooser]], draws: int, seed: int,
                     lookahead_arms: Collection[str] = ()) -> dict:
    """Every arm's action in every test cell, with the matrices their rewards come from.

    An arm is a list of choosers, one per training seed (baselines have one). The result is what
    metrics.json stores as ``offline_test``: summaries recompute every figure from it alone. With a look-ahead
    state the top-level matrices are the pricing without it (static actions, random, oracle, every arm not in
    ``lookahead_arms``) and ``lookahead`` holds the pricing of the arms that read it, with their names.
    """
    cells = env.cells(draws, seed)
    actions = {name: [[int(choose(cell)) for cell in cells] for choose in choosers] for name, choosers in arms.items()}
    c_idx, p_idx = [cell.calibration for cell in cells], [cell.prompt for cell in cells]

    def matrices(pricing: Pricing) -> dict:
        return {"reward": pricing.reward[c_idx, p_idx].tolist(), "speedup": pricing.speedup[c_idx, p_idx].tolist(),
                "ppl_ratio": pricing.ppl_ratio[p_idx].tolist(), "kl": pricing.kl[p_idx].tolist(),
                "latency_s": pricing.latency[c_idx, p_idx].tolist()}
    paid = set(lookahead_arms)
    unknown = paid - set(arms)
    if unknown:
        raise ValueError(f"look-ahead arms {sorted(unknown)} are not among the arms scored")
    out = {
        "actions": env.labels, "levels": env.levels,
        "objective": {"objective": env.reward_cfg.objective, "slo_share": env.reward_cfg.slo_share,
                      "quality_budget": env.reward_cfg.quality_budget, "multiplier": env.multiplier},
        "cells": {"prompt_id": [env.prompts[p].id for p in p_idx], "level": [env.level(cell) for cell in cells],
                  "round": [env.cals[c].round for c in c_idx], "telemetry": [cell.telemetry for cell in cells]},
        **matrices(env.static_pricing),
        "budget_s": [None if np.isinf(b) else float(b) for b in env.budget[c_idx, p_idx]],
        "arms": actions,
    }
    if env.has_lookahead:
        out["lookahead"] = {"arms": [a for a in arms if a in paid], **matrices(env.pricing)}
    return out


def selection_cost(env) -> dict | None:
    """The per-request cost of --importance probe's unit selection and gather, against the dense generation of the
    same request (what a deployed request pays before its decode; not in the latency tables' speedups), over the
    selections measured in this process (None: none)."""
    if not env.selection_costs:
        return None
    costs = np.array([cost for cost, _ in env.selection_costs])
    shares = np.array([cost / dense for cost, dense in env.selection_costs if dense > 0])
    out = {"selections": len(costs), "median_s": float(np.median(costs)),
           "median_share_of_dense_generation": float(np.median(shares)) if shares.size else None}
    log.info("per-request unit selection + gather (--importance probe): median %.1f ms over %d selections, %s of "
             "the request's dense generation (median)", 1e3 * out["median_s"], out["selections"],
             "n/a" if shares.size == 0 else f"{100 * out['median_share_of_dense_generation']:.1f} %")
    return out


def calibration_settings(cfg, engine: dict, scenarios, labels: Sequence[str], buckets: Sequence[str],
                         calibration_texts: Sequence[str]) -> dict:
    """Everything a calibration set depends on: the engine, the levels, the timing protocol, this machine."""
    return {"engine": {k: v for k, v in engine.items() if k not in ("max_new_tokens", "min_reference_tokens",
                                                                     "prompt_kl_tokens")},
            "levels": [s.to_dict() for s in scenarios], "rounds": 2 * cfg.offline.calibrations,
            "calibration_tokens": cfg.env.calibration_tokens, "repeats": cfg.env.calibration_repeats,
            "labels": list(labels), "buckets": list(buckets), "prompts": digest({"texts": list(calibration_texts)}),
            "telemetry_schema": list(HardwareState.FEATURE_NAMES),   # the recorded vectors' slots
            "host": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def cache_root(cfg) -> Path:
    return Path(cfg.offline.cache_dir) if cfg.offline.cache_dir else hub.cache_dir() / "offline"


def cached_probe_outcomes(s, prompts: Sequence[Prompt]) -> dict:
    """The outcomes (with probe features) and syntax features of those ``prompts`` the outcome cache holds, measured
    by an earlier run (a test run's training prompts: the in-study headroom report reads them); nothing measured."""
    cache = OutcomeCache(cache_root(s.cfg) / "outcomes", engine_settings(s.cfg, s.loaded.name, s.loaded.source))
    known = {p.id: (p, o) for p in prompts if (o := cache.load(p)) is not None and o.has_probe(s.actions)}
    texts = [p.text for p, _ in known.values()]
    features = s.analyzer.analyze_batch(texts, tokenizer=s.loaded.tokenizer) if texts else []
    return {"outcomes": {pid: asdict(o) for pid, (_, o) in known.items()},
            "features": {pid: asdict(f) for pid, f in zip(known, features)}}


def build_offline_data(s, prompts: Sequence[Prompt], calibration_prompts: Sequence[Prompt], scenarios) -> OfflineData:
    """Outcomes of `prompts` and the calibration set, from the caches or measured now with session `s`.

    Calibration prompts (the training prompts, so train and test share one calibration set) set the
    timed short and long inputs; the buckets are those `prompts` and the calibration prompts fall in.
    """
    cfg, env = s.cfg, s.env
    root = cache_root(cfg)
    engine = engine_settings(cfg, s.loaded.name, s.loaded.source)
    outcomes = precompute(env, OutcomeCache(root / "outcomes", engine), prompts, s.actions,
                          cfg.offline.prompt_kl_tokens, cfg.offline.executor, cfg, cfg.offline.ray_address,
                          probe=uses_probe(cfg.state_features), lookahead=uses_lookahead(cfg.state_features))
    selection = selection_cost(env)
    texts = [p.text for p in calibration_prompts][:64]
    env.set_calibration_prompts(texts)
    buckets = sorted({env.bucket(env.encode(p.text)[0].numel()) for p in [*prompts, *calibration_prompts]},
                     key=["short", "long"].index)
    labels = [a.label for a in s.actions]
    settings = calibration_settings(cfg, engine, scenarios, labels, buckets, texts)
    path = root / "calibrations" / f"{digest(settings)}.json"
    cs = (CalibrationSet.from_dict(json.loads(path.read_text())) if path.is_file()
          else CalibrationSet([sc.name for sc in scenarios], {sc.name: sc.min_slowdown for sc in scenarios},
                              buckets, settings))
    Calibrator(env, s.sampler, scenarios, s.actions, cfg.env.calibration_repeats, cfg.seed).run(
        cs, settings["rounds"], save=lambda c: atomic_write_text(path, json.dumps(c.to_dict())))
    features = s.analyzer.analyze_batch([p.text for p in prompts], tokenizer=s.loaded.tokenizer, progress=True)
    return OfflineData(list(prompts), outcomes, cs, {p.id: f for p, f in zip(prompts, features)}, selection)
