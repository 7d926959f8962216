"""Build the parts a run needs (model, engine, observation, environment) from a RunConfig."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

from controller.environment import PruningEnvironment
from model_loader import LoadedModel, load_model
from pruners import ActionSpaceConfig, PruningAction, PruningEngine, build_action_space
from common.config import RunConfig
from controller.load_signals import CONTENTION, SlowdownTracker
from controller.state import StateBuilder

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


def build_engine(cfg: RunConfig, loaded: LoadedModel) -> PruningEngine:
    """The run's engine: the same mode, importance and KV threshold in train, test and eval.

    Importance reads the engine's fixed built-in calibration prompts, so every mode prunes the
    same units for the same action.
    """
    return PruningEngine(loaded.model, mode="structural" if cfg.structural else "mask",
                         importance=cfg.importance, tokenizer=loaded.tokenizer,
                         kv_min_tokens=cfg.env.long_prompt_tokens)


@contextlib.contextmanager
def open_session(cfg: RunConfig):
    """Yields a Session; the telemetry sampler runs for the session's lifetime."""
    from nlp_analyzer import PromptAnalyzer
    from controller.telemetry import TelemetrySampler

    loaded = load_model(cfg.model, device=cfg.device)
    if cfg.env.max_new_tokens >= loaded.context_length // 2:
        raise ValueError(f"--max-new-tokens {cfg.env.max_new_tokens} leaves too little of {loaded.name}'s "
                         f"{loaded.context_length}-token context for the prompt: use at most {loaded.context_length // 2 - 1}")
    engine = build_engine(cfg, loaded)
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
