"""Build the parts a run needs (model, engine, observation, environment) from a RunConfig."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from environments.live import PruningEnvironment
from model_loader import LoadedModel, load_model
from pruners import PRUNE_TARGETS, ActionSpaceConfig, PruningAction, PruningEngine, build_action_space
from pruners.recovery.elastic import ensure_stored_order, find_menu
from runtime.dtype import apply_weight_dtype, set_kernel
from runtime.matvec import matvec_kernel
from common.calibration import calibration_set
from common.config import (PROBE_BLEND, PROBE_IMPORTANCE, EngineConfig, RunConfig, hardware_kind, static_importance,
                           uses_probe)
from machine.load_signals import CONTENTION, SlowdownTracker
from environments.state import StateBuilder

log = logging.getLogger(__name__)


@dataclass
class Session:
    cfg: RunConfig
    loaded: LoadedModel
    engine: PruningEngine
    actions: list[PruningAction]
    states: StateBuilder
    env: PruningEnvironment
    sampler: object
    analyzer: object


def run_targets(cfg: RunConfig) -> tuple[str, ...]:
    """The run's pruning targets (``--targets``; None: every registered target)."""
    return PRUNE_TARGETS if cfg.targets is None else tuple(cfg.targets)


def action_space(cfg: RunConfig) -> list[PruningAction]:
    return build_action_space(ActionSpaceConfig(targets=run_targets(cfg), intensities=tuple(cfg.intensities)))


def trained_engine(config: dict) -> dict:
    """The engine settings a run's stored config was trained with (``EngineConfig.from_stored``)."""
    return EngineConfig.from_stored(config).to_dict()


def with_trained_engine(cfg: RunConfig, trained: dict, explicit: set[str]) -> RunConfig:
    """``cfg`` with a checkpoint's engine settings, except those the user set explicitly: a policy is
    tested on the menu (units, compensation) it learned."""
    stored = EngineConfig.from_stored(trained)
    calibration = replace(cfg.calibration, **{k: v for k, v in asdict(stored.calibration).items()
                                              if f"calibration.{k}" not in explicit})
    return replace(cfg, calibration=calibration, **{k: getattr(stored, k) for k in EngineConfig.names()
                                                    if k != "calibration" and k not in explicit})


def engine_mismatch(cfg: RunConfig, trained: dict) -> str | None:
    """The flags that would give ``cfg`` the engine a checkpoint's policy learned on, or None when it has it."""
    # structural / mask remove the same units (the menu is the same); calibration.max_tokens has no flag
    flags = [f"--{path.replace('.', '-').replace('_', '-')} {value}"
             for path, value in EngineConfig.of(cfg).differences(EngineConfig.from_stored(trained))
             if path not in ("structural", "calibration.max_tokens")]
    return " ".join(flags) or None


def build_engine(cfg: RunConfig, loaded: LoadedModel, actions: Sequence[PruningAction] = (),
                 cache_dir: Path | None = None) -> PruningEngine:
    """The run's engine: the same mode, importance, calibration, allocation, recovery and KV threshold in
    train, test, eval and export, so every mode prunes (and compensates) the same units for the same action.

    ``actions`` are prepared now (plans and compensation, cached on disk), not inside a timed episode.
    A healed model folder (``--model DIR`` with an ``elastic.pt`` sidecar, ``--mode heal``) brings its own
    unit order, plans and compensation; the engine uses them and records the folder in ``describe()``.
    """
    menu = find_menu(loaded.name) if loaded.source == "local" else None
    if menu is not None:
        ensure_stored_order(loaded.model, menu)
    # the decode kernel first: it may re-lay the weights, and the engine's prefix views are taken from them
    set_kernel(loaded.model, matvec_kernel(cfg.matvec, next(loaded.model.parameters()).device))
    engine = PruningEngine(loaded.model, mode="structural" if cfg.structural else "mask", menu=menu,
                           importance=static_importance(cfg.importance), tokenizer=loaded.tokenizer,
                           calibration=calibration_set(cfg.calibration), calibration_max_tokens=cfg.calibration.max_tokens,
                           allocation=cfg.allocation, recovery=cfg.recovery, kv_min_tokens=cfg.env.long_prompt_tokens,
                           cache_dir=cache_dir)
    engine.prepare(actions)
    apply_weight_dtype(loaded.model, cfg.dtype)   # after the engine: its scores and compensation read fp32 weights
    return engine


def probe_options(cfg: RunConfig) -> dict:
    """What the environment reads from each request's dense prefill: probe features for the state, and the
    blend weight of the per-request unit selection (None: the engine's static order)."""
    return {"record_prefill": uses_probe(cfg.state_features) or cfg.importance == PROBE_IMPORTANCE,
            "probe_blend": PROBE_BLEND if cfg.importance == PROBE_IMPORTANCE else None}


@contextlib.contextmanager
def open_session(cfg: RunConfig):
    """Yields a Session; the telemetry sampler runs for the session's lifetime."""
    from nlp_analyzer import PromptAnalyzer
    from machine.telemetry import TelemetrySampler

    loaded = load_model(cfg.model, device=cfg.device)
    if cfg.env.max_new_tokens >= loaded.context_length // 2:
        raise ValueError(f"--max-new-tokens {cfg.env.max_new_tokens} leaves too little of {loaded.name}'s "
                         f"{loaded.context_length}-token context for the prompt: use at most {loaded.context_length // 2 - 1}")
    engine = build_engine(cfg, loaded, action_space(cfg))
    budget = cfg.observation_budget_ms if cfg.observation_budget_ms > 0 else None
    analyzer = PromptAnalyzer(cfg.nlp_backend, budget_ms=budget)
    # checkpoints store the backend used, not "auto", and the targets of the action space, not "every target"
    cfg = replace(cfg, nlp_backend=analyzer.backend, targets=run_targets(cfg))
    with TelemetrySampler(rate_hz=cfg.telemetry_hz) as sampler:
        slowdown = SlowdownTracker() if hardware_kind(cfg.state_features) == CONTENTION else None
        states = StateBuilder(analyzer, sampler, tokenizer=loaded.tokenizer, ablation=cfg.ablation, slowdown=slowdown)
        env = PruningEnvironment(loaded, engine, cfg.reward, cfg.env, gpu=sampler.probe.gpu, slowdown=slowdown,
                                 **probe_options(cfg))
        try:
            yield Session(cfg, loaded, engine, action_space(cfg), states, env, sampler, analyzer)
        finally:
            engine.restore()
