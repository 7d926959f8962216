"""A Double-DQN serving policy: trained in the queueing simulator with gamma > 0, served by the live scheduler.

One decision per scheduler step; the transition's reward is what the step did to the requests (tokens on
time minus tokens late, per request's length, minus a whole request for each arrival turned away, minus the
served tokens' log PPL ratio), so a decision that lets the queue grow is paid for by the later steps that
face it: that is what the discount carries.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.config import DQNConfig, ServeConfig
from controller.dqn import DoubleDQNAgent, linear_epsilon
from environments.queueing.policies import STATE_SIZE, ServeState
from environments.queueing.simulator import ServingSimulator, SimRequest, Step
from pruners.actions import PruningAction

log = logging.getLogger(__name__)
KIND = "serving-dqn"


@dataclass(frozen=True)
class ServeReward:
    """Reward of one step; ``log_ratio`` is each action's mean log PPL ratio on the fitting prompts."""
    log_ratio: Mapping[str, float]
    output_tokens: int
    quality_weight: float = 1.0

    def __call__(self, step: Step) -> float:
        tokens = self.output_tokens
        quality = sum(self.log_ratio[label] for label in step.labels)
        return (step.on_time - step.late - self.quality_weight * quality) / tokens - step.rejected


class QServePolicy:
    """Greedy (or epsilon-greedy while training) over the actions the batch allows."""

    def __init__(self, agent: DoubleDQNAgent, menu: Sequence[PruningAction], epsilon: float = 0.0,
                 name: str = "dqn") -> None:
        self.agent, self.menu, self.epsilon, self.name = agent, list(menu), epsilon, name
        self._index = {a: i for i, a in enumerate(self.menu)}

    def decide(self, state: ServeState, allowed: Sequence[PruningAction]) -> PruningAction:
        indices = [self._index[a] for a in allowed]
        if self.epsilon and self.agent.rng.random() < self.epsilon:
            return self.menu[int(self.agent.rng.choice(indices))]
        q = self.agent.q_values(np.asarray(state.vector()))
        return self.menu[max(indices, key=lambda i: q[i])]


class _Learner(QServePolicy):
    """Turns the simulator's decide / on_step calls into (s, a, r, s', done) transitions."""

    def __init__(self, agent, menu, reward: ServeReward) -> None:
        super().__init__(agent, menu)
        self.reward, self._pending = reward, None

    def decide(self, state: ServeState, allowed):
        self._flush(state.vector(), done=False)
        action = super().decide(state, allowed)
        self._pending = [state.vector(), self._index[action], 0.0]
        return action

    def on_step(self, step: Step) -> None:
        self._pending[2] = self.reward(step)

    def _flush(self, next_state, done: bool) -> None:
        if self._pending is not None:
            state, action, reward = self._pending
            self.agent.store_and_learn(state, action, reward, next_state, done)
            self._pending = None

    def end(self) -> None:
        if self._pending is not None:
            self._flush(self._pending[0], done=True)


def train_serving_policy(sim: ServingSimulator, traces: Sequence[Sequence[SimRequest]], menu: Sequence[PruningAction],
                         reward: ServeReward, cfg: DQNConfig, epochs: int = 1) -> DoubleDQNAgent:
    """Double DQN over the training traces (each an episode), epsilon decaying over all of them."""
    agent = DoubleDQNAgent(STATE_SIZE, len(menu), cfg)
    learner = _Learner(agent, menu, reward)
    episodes = [t for _ in range(epochs) for t in traces]
    rng = np.random.default_rng(cfg.seed)
    for n, index in enumerate(tqdm(rng.permutation(len(episodes)), desc="serving DQN", unit="trace")):
        learner.epsilon = linear_epsilon(cfg, n, len(episodes))
        sim.run(episodes[index], learner, menu, on_step=learner.on_step)
        learner.end()
    return agent


def save_serving_policy(path: Path, agent: DoubleDQNAgent, menu: Sequence[PruningAction], serve: ServeConfig,
                        reward: ServeReward, cfg: DQNConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": KIND, "menu": [a.label for a in menu], "agent": agent.state_dict(include_buffer=False),
                "dqn": cfg.to_dict(), "serve": serve.to_dict(), "reward": asdict(reward)}, path)


def load_serving_policy(path: Path, flag: str = "--serve-policy") -> QServePolicy:
    """A policy saved by ``save_serving_policy``; the menu it learned comes with it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{flag} {path} not found: train one with bench/serve_study.py --stage train") from err
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise ValueError(f"{flag} {path} is not a serving policy (a per-prompt --mode train checkpoint cannot "
                         "serve): train one with bench/serve_study.py --stage train")
    cfg = DQNConfig(**{**payload["dqn"], "hidden_sizes": tuple(payload["dqn"]["hidden_sizes"])})
    menu = [PruningAction.parse(label) for label in payload["menu"]]
    agent = DoubleDQNAgent(STATE_SIZE, len(menu), cfg)
    agent.load_state_dict(payload["agent"])
    return QServePolicy(agent, menu, name=f"dqn:{Path(path).name}")


def mean_log_ratio(ppl_ratio: Mapping[str, Sequence[float]], prompts: Sequence[int]) -> dict[str, float]:
    return {label: float(np.mean([math.log(max(values[p], 1e-9)) for p in prompts])) for label, values in ppl_ratio.items()}
