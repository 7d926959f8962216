"""Build the parts a run needs (model, engine, observation, environment) from a RunConfig."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from environments.live import PruningEnvironment
from model_loader import LoadedModel, load_model
from pruners import ActionSpaceConfig, PruningAction, PruningEngine, build_action_space
from pruners.elastic import ensure_stored_order, find_menu
from runtime.dtype import apply_weight_dtype
from common.calibration import CALIBRATION_SENTENCES, SENTENCES, calibration_set
from common.config import RunConfig
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


def action_space(cfg: RunConfig) -> list[PruningAction]:
    return build_action_space(ActionSpaceConfig(targets=tuple(cfg.targets), intensities=tuple(cfg.intensities)))


# Engine settings a checkpoint stores; checkpoints from before issue 15 were trained on this menu.
LEGACY_ENGINE = {"allocation": "uniform", "recovery": "none",
                 "calibration": {"dataset": SENTENCES, "samples": len(CALIBRATION_SENTENCES), "max_tokens": 256}}
ENGINE_FIELDS = ("importance", "allocation", "recovery")


def trained_engine(config: dict) -> dict:
    """The engine settings a run's stored config was trained with (legacy defaults where absent)."""
    return {**{k: config.get(k, LEGACY_ENGINE.get(k)) for k in ENGINE_FIELDS},
            "calibration": config.get("calibration", LEGACY_ENGINE["calibration"])}


def with_trained_engine(cfg: RunConfig, trained: dict, explicit: set[str]) -> RunConfig:
    """``cfg`` with a checkpoint's engine settings, except those the user set explicitly: a policy is
    tested on the menu (units, compensation) it learned."""
    settings = trained_engine(trained)
    calibration = replace(cfg.calibration, **{k: v for k, v in settings["calibration"].items()
                                              if f"calibration.{k}" not in explicit})
    return replace(cfg, calibration=calibration, **{k: settings[k] for k in ENGINE_FIELDS if k not in explicit})


def engine_mismatch(cfg: RunConfig, trained: dict) -> str | None:
    """The flags that would give ``cfg`` the engine a checkpoint's policy learned on, or None when it has it."""
    settings, ours = trained_engine(trained), {**{k: getattr(cfg, k) for k in ENGINE_FIELDS},
                                               "calibration": asdict(cfg.calibration)}
    flags = [f"--{k} {settings[k]}" for k in ENGINE_FIELDS if settings[k] != ours[k]]
    for key, flag in (("dataset", "--calibration-dataset"), ("samples", "--calibration-samples")):
        if settings["calibration"].get(key) != ours["calibration"][key]:
            flags.append(f"{flag} {settings['calibration'].get(key)}")
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
    engine = PruningEngine(loaded.model, mode="structural" if cfg.structural else "mask", menu=menu,
                           importance=cfg.importance, tokenizer=loaded.tokenizer,
                           calibration=calibration_set(cfg.calibration), calibration_max_tokens=cfg.calibration.max_tokens,
                           allocation=cfg.allocation, recovery=cfg.recovery, kv_min_tokens=cfg.env.long_prompt_tokens,
                           cache_dir=cache_dir)
    engine.prepare(actions)
    apply_weight_dtype(loaded.model, cfg.dtype)   # after the engine: its scores and compensation read fp32 weights
    return engine


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
    cfg = replace(cfg, nlp_backend=analyzer.backend)   # checkpoints store the backend used, not "auto"
    with TelemetrySampler(rate_hz=cfg.telemetry_hz) as sampler:
        slowdown = SlowdownTracker() if cfg.state_features == CONTENTION else None
        states = StateBuilder(analyzer, sampler, tokenizer=loaded.tokenizer, ablation=cfg.ablation, slowdown=slowdown)
        env = PruningEnvironment(loaded, engine, cfg.reward, cfg.env, gpu=sampler.probe.gpu, slowdown=slowdown)
        try:
            yield Session(cfg, loaded, engine, action_space(cfg), states, env, sampler, analyzer)
        finally:
            engine.restore()
