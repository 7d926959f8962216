"""A trained policy as a router: observe, decide, hand back the action (for eval and serving)."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from controller import checkpointing
from pruners import ActionSpaceConfig, PruningAction, build_action_space
from controller.dqn import DoubleDQNAgent, DQNConfig
from common.config import PROBE_IMPORTANCE, hardware_kind, uses_lookahead, uses_probe
from machine.load_signals import BASIC, CONTENTION, SlowdownTracker
from environments.state import StateBuilder, state_feature_names


class PolicyRouter:
    """Greedy policy over a checkpoint's action space; counts its choices and its own overhead."""

    def __init__(self, agent: DoubleDQNAgent, actions: list[PruningAction], states: StateBuilder, owned_sampler=None):
        self.agent, self.actions, self.states = agent, actions, states
        self.owned_sampler = owned_sampler     # started by load_router, so stopped by close()
        self.histogram: Counter[str] = Counter()
        self.overhead_s = 0.0
        self.decisions = 0

    def close(self) -> None:
        if self.owned_sampler is not None:
            self.owned_sampler.stop()
            self.owned_sampler = None

    def choose(self, text: str) -> PruningAction:
        started = time.perf_counter()
        obs = self.states.build(text)
        action = self.actions[int(np.argmax(self.agent.q_values(obs.state)))]
        self.overhead_s += time.perf_counter() - started
        self.decisions += 1
        self.histogram[action.label] += 1
        return action


def load_router(checkpoint: str | Path, loaded, sampler=None, analyzer=None) -> PolicyRouter:
    """Rebuild the policy of a checkpoint for `loaded` (refused if trained for another model).

    The caller applies the chosen actions and owns the sampler when it passes one.
    """
    from nlp_analyzer import PromptAnalyzer
    from machine.telemetry import TelemetrySampler

    payload = checkpointing.load_checkpoint(Path(checkpoint))
    cfg = payload["config"]
    problem = per_request_probe(cfg)
    if problem:
        raise checkpointing.CheckpointError(f"checkpoint {checkpoint} {problem}, which a router deciding before the "
                                            "prefill cannot compute: test it with --mode test")
    agent, actions = agent_from_checkpoint(payload, loaded.name)
    owned = TelemetrySampler().start() if sampler is None else None
    analyzer = analyzer or PromptAnalyzer(cfg.get("nlp_backend", "auto"))   # the features it was trained on
    # A contention-state policy reads the observed slowdown too; routed scoring times no generation, so
    # its tracker stays empty and the state says so (slowdown_ok = 0), as on a first request.
    slowdown = SlowdownTracker() if hardware_kind(cfg.get("state_features", BASIC)) == CONTENTION else None
    states = StateBuilder(analyzer, sampler or owned, tokenizer=loaded.tokenizer, ablation=cfg.get("ablation", "none"),
                          slowdown=slowdown)
    return PolicyRouter(agent, actions, states, owned_sampler=owned)


def per_request_probe(config: dict) -> str | None:
    """What of a stored run config reads each request's own prefill (probe state features, per-request units),
    or None."""
    if uses_probe(config.get("state_features", BASIC)):
        return f"was trained with --state-features {config['state_features']} (features of the request's prefill)"
    if uses_lookahead(config.get("state_features", BASIC)):
        return (f"was trained with --state-features {config['state_features']} (each action's KL on a dense "
                "look-ahead of the request)")
    if config.get("importance") == PROBE_IMPORTANCE:
        return f"was trained with --importance {PROBE_IMPORTANCE} (units chosen from the request's prefill)"
    return None


def agent_from_checkpoint(payload: dict, model_id: str) -> tuple[DoubleDQNAgent, list[PruningAction]]:
    """The trained agent (with its own network shape) and its action space; refused for another model."""
    cfg = payload["config"]
    actions = build_action_space(ActionSpaceConfig(targets=tuple(cfg["targets"]),
                                                   intensities=tuple(cfg["intensities"])))
    stored = payload.get("state_features") or []
    probe = [n.removeprefix("probe.") for n in stored if n.startswith("probe.")]
    features = state_feature_names(cfg.get("state_features", BASIC), probe,   # checkpoints before it: basic
                                   [a.label for a in actions])
    checkpointing.check_compatible(payload, model_id=model_id, action_space=[a.label for a in actions],
                                   state_features=features)
    dqn = DQNConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["dqn"].items()})
    agent = DoubleDQNAgent(len(features), len(actions), dqn)
    agent.load_state_dict(payload["agent"])
    return agent, actions
