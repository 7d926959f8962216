"""Training and test loops: the Double DQN learns which action pays off per prompt and load.

Interrupts (Ctrl-C, SIGTERM) end the loop between episodes' side effects: the model is
restored, a consistent checkpoint and a partial report are written, and `--resume` continues.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from tqdm import tqdm

from controller import checkpointing
from common.config import DQNConfig
from common.data import Prompt, load_prompts
from environments.latency_table import LatencyTable
from environments.precomputed import Cell, OfflineEnvironment
from environments.records import EpisodeRecord, Outcome, PromptResult, to_jsonable
from controller.dqn import DoubleDQNAgent, linear_epsilon
from machine.replay import RecordedHardware, load_trace
from machine.contention import ScenarioSchedule, contention, parse_scenarios
from environments.session import Session
from environments.state import state_feature_names

log = logging.getLogger(__name__)


def train_prompts(spec: str, seed: int, test_fraction: float, samples: int) -> list[Prompt]:
    train, _ = load_prompts(spec, seed=seed).split(test_fraction=test_fraction, seed=seed)
    return list(train.take(samples).prompts)


def observe_or_replay(session: Session, prompt: Prompt, trace: list[list[float]] | None, index: int):
    """The prompt's Observation under live telemetry, or under the index-th recorded hardware state
    (cyclically) when replaying a trace."""
    if trace is None:
        return session.states.build(prompt.text)
    return session.states.build(prompt.text, hardware=RecordedHardware(trace[index % len(trace)]))


class Trainer:
    """The live bandit loop (apart from train_offline because it generates under real load, re-decides every
    N tokens, and checkpoints to resume; both share the agent's act/store_and_learn and the episode record)."""

    def __init__(self, session: Session, train_prompts: list[Prompt], provenance: dict):
        self.s, self.cfg = session, session.cfg
        self.prompts = train_prompts
        self.provenance = provenance
        self.feature_names = state_feature_names(self.cfg.state_features)
        self.agent = DoubleDQNAgent(len(self.feature_names), len(session.actions), self.cfg.dqn)
        self.schedule = ScenarioSchedule(parse_scenarios(self.cfg.scenarios), self.cfg.scenario_block, self.cfg.seed)
        self.order = np.random.default_rng(self.cfg.seed + 2).permutation(len(train_prompts))
        n_hardware = sum(name.startswith("hw.") for name in self.feature_names)
        self.trace = load_trace(self.cfg.telemetry_trace, n_hardware) if self.cfg.telemetry_trace else None
        self.episodes: list[EpisodeRecord] = []
        self.start_episode = self.next_episode = 0

    # ---- checkpoint -----------------------------------------------------------------------
    def checkpoint_payload(self, next_episode: int) -> dict:
        return {"model_id": self.s.loaded.name, "action_space": [a.label for a in self.s.actions],
                "state_features": self.feature_names, "config": self.cfg.to_dict(),
                "agent": self.agent.state_dict(include_buffer=self.cfg.save_buffer),
                "next_episode": next_episode,
                "epsilon": linear_epsilon(self.cfg.dqn, next_episode, self.cfg.episodes),
                "latency_table": json.dumps(self.s.env.table.to_dict()),
                "history": json.dumps(to_jsonable(self.episodes)),
                "code_version": (self.provenance.get("git") or {}).get("commit"), "dataset": self.cfg.train_dataset,
                "seed": self.cfg.seed, "test_fraction": self.cfg.test_fraction}

    def save(self, next_episode: int) -> None:
        checkpointing.save_checkpoint(Path(self.cfg.checkpoint), self.checkpoint_payload(next_episode))

    def resume(self) -> None:
        payload = checkpointing.load_checkpoint(Path(self.cfg.checkpoint))
        checkpointing.check_compatible(payload, model_id=self.s.loaded.name,
                                       action_space=[a.label for a in self.s.actions],
                                       state_features=self.feature_names)
        self.agent.load_state_dict(payload["agent"])
        self.s.env.table = LatencyTable.from_dict(json.loads(payload["latency_table"]))
        self.start_episode = self.next_episode = int(payload["next_episode"])
        self.episodes = [EpisodeRecord(**{**e, "outcome": Outcome(**e["outcome"]) if e["outcome"] else None})
                         for e in json.loads(payload["history"])]
        log.info("resumed from %s at episode %d", self.cfg.checkpoint, self.start_episode)

    # ---- loop -----------------------------------------------------------------------------
    def ensure_calibrated(self, scenario_name: str) -> None:
        env = self.s.env
        actions = self.s.actions if self.cfg.env.timing == "table" else self.s.actions[:1]
        if not env.table.has(scenario_name):
            env.calibrate(scenario_name, actions)

    def run(self, metrics_writer) -> None:
        """Train from start_episode; KeyboardInterrupt propagates with `next_episode` up to date."""
        cfg = self.cfg
        current = None
        with contextlib.ExitStack() as load:
            self.ensure_calibrated("idle")         # the latency budget is relative to idle dense latency
            bar = tqdm(range(self.start_episode, cfg.episodes), desc="train", initial=self.start_episode,
                       total=cfg.episodes)
            for episode in bar:
                scenario = self.schedule.scenario_for(episode)
                if scenario != current:
                    load.close()
                    current = scenario
                    # Replaying a telemetry trace against a given table: no reward or state depends on
                    # the live load, so none is generated.
                    if self.trace is None or not self.s.env.table.has(scenario.name):
                        load.enter_context(contention(scenario))
                    self.ensure_calibrated(scenario.name)
                records = self.episode(episode, scenario.name)
                self.episodes.extend(records)
                self.next_episode = episode + 1
                bar.set_postfix_str(self.live_summary(scenario.name))
                if self.next_episode % cfg.save_every == 0:
                    self.save(self.next_episode)
                    metrics_writer(self.episodes, partial=True, reason="training in progress")
        self.save(cfg.episodes)

    def segments(self, prompt: Prompt) -> list[tuple[int, int | None]]:
        """(start, length) of each decision: one for the whole continuation, or one every N tokens."""
        n = self.cfg.redecide_every
        if not n:
            return [(0, None)]
        total = self.s.env.reference(prompt).ref_ids.numel()
        return [(start, n) for start in range(0, total, n)]

    def live_summary(self, scenario: str, window: int = 20) -> str:
        """Scenario, last action and the recent mean reward, for the progress bar."""
        recent = [r.outcome.reward for r in self.episodes[-window:] if r.outcome]
        last = self.episodes[-1]
        action = last.outcome.action if last.outcome else "failed"
        mean = f"{sum(recent) / len(recent):+.3f}" if recent else "n/a"
        return f"{scenario} | {action} | mean r (last {len(recent)}) {mean}"

    def episode(self, episode: int, scenario: str) -> list[EpisodeRecord]:
        """One prompt: one decision, or a decision every --redecide-every tokens (gamma applies)."""
        env, agent, cfg = self.s.env, self.agent, self.cfg
        prompt = self.prompts[self.order[episode % len(self.prompts)]]
        epsilon = linear_epsilon(cfg.dqn, episode, cfg.episodes)
        records: list[EpisodeRecord] = []
        obs = observe_or_replay(self.s, prompt, self.trace, len(self.episodes))
        try:
            ref = env.reference(prompt)
            segments = self.segments(prompt)
        except (RuntimeError, ValueError) as err:
            self.s.engine.restore()
            return [self._failed(episode, prompt, scenario, obs, epsilon, err, ref=None)]
        for k, (start, length) in enumerate(segments):
            started = time.perf_counter()
            index, explored, q = agent.act(obs.state, epsilon)
            controller_s = obs.controller_s + time.perf_counter() - started
            decision = dict(action_index=index, explored=explored, q_values=[float(v) for v in q],
                            controller_s=controller_s)
            base = self._base(episode, prompt, scenario, obs, epsilon, ref) | decision
            last = k == len(segments) - 1
            try:
                outcome = env.step(prompt, self.s.actions[index], scenario, hardware=obs.hardware,
                                   start=start, length=length)
                next_obs = obs if last else observe_or_replay(self.s, prompt, self.trace, len(self.episodes))
                loss = agent.store_and_learn(obs.state, index, outcome.reward, next_obs.state, last)
            except (RuntimeError, FloatingPointError, ValueError) as err:   # OOM is a RuntimeError
                self.s.engine.restore()
                records.append(self._failed(episode, prompt, scenario, obs, epsilon, err, ref, **decision))
                break
            records.append(EpisodeRecord(**base, outcome=outcome, loss=loss))
            obs = next_obs
        return records

    def _base(self, episode: int, prompt: Prompt, scenario: str, obs, epsilon: float, ref) -> dict:
        return dict(episode=episode, step=self.agent.steps, prompt_id=prompt.id, category=prompt.category,
                    prompt_tokens=int(ref.prompt_ids.numel()) if ref else 0,
                    truncated=bool(ref.truncated) if ref else False,
                    complexity=float(obs.features.complexity), scenario=scenario, epsilon=epsilon,
                    hardware=[float(v) for v in obs.hardware.vector])

    def _failed(self, episode, prompt, scenario, obs, epsilon, err, ref, **decision) -> EpisodeRecord:
        log.warning("episode %d failed and was skipped: %s", episode, err)
        fields = {"action_index": -1, "explored": False} | self._base(episode, prompt, scenario, obs, epsilon, ref) | decision
        return EpisodeRecord(**fields, outcome=None, failed=f"{err.__class__.__name__}: {err}")


def evaluate_prompts(session: Session, prompts: list[Prompt], scenario_name: str, choose,
                     others: Mapping[str, Callable[[Any], int]] | None = None,
                     trace: list[list[float]] | None = None,
                     ) -> tuple[list[PromptResult], dict[str, list[PromptResult]]]:
    """Per prompt: the policy's action, every static action, and the oracle (best reward).

    `others` (name -> chooser of an Observation) are further policies, e.g. ablations, deciding on
    the same observation; their outcome is the static outcome of the action they pick (the same
    reward, no extra generation), so their difference to the policy is paired exactly. A `trace`
    replays recorded hardware states (prompt i sees state i) instead of live telemetry.
    """
    env, results = session.env, []
    other_results: dict[str, list[PromptResult]] = {name: [] for name in others or {}}
    for i, prompt in enumerate(tqdm(prompts, desc=f"test [{scenario_name}]", leave=False)):
        obs = observe_or_replay(session, prompt, trace, i)
        started = time.perf_counter()
        index = choose(obs.state)
        controller_s = obs.controller_s + time.perf_counter() - started
        ref = env.reference(prompt)
        static = {a.label: env.step(prompt, a, scenario_name, hardware=obs.hardware, measure=False)
                  for a in session.actions}
        policy_action = session.actions[index]
        policy = env.step(prompt, policy_action, scenario_name, hardware=obs.hardware, measure=True)
        oracle = max(static.values(), key=lambda o: o.reward)

        def result(action, outcome: Outcome, overhead_s: float) -> PromptResult:
            return PromptResult(prompt_id=prompt.id, category=prompt.category,
                                prompt_tokens=int(ref.prompt_ids.numel()),
                                complexity=float(obs.features.complexity), scenario=scenario_name,
                                policy_action=action.label, policy=outcome, static=static,
                                oracle_action=oracle.action, oracle_reward=oracle.reward,
                                controller_s=overhead_s, truncated=ref.truncated)

        results.append(result(policy_action, policy, controller_s))
        for name, other in (others or {}).items():
            started = time.perf_counter()
            action = session.actions[other(obs)]
            other_results[name].append(result(action, static[action.label],
                                              obs.controller_s + time.perf_counter() - started))
    return results, other_results


def greedy_chooser(agent: DoubleDQNAgent):
    return lambda state: int(np.argmax(agent.q_values(state)))


def train_offline(env: OfflineEnvironment, dqn: DQNConfig, episodes: int, seed: int,
                  progress: bool = True) -> tuple[DoubleDQNAgent, list[EpisodeRecord], float]:
    """The live trainer's bandit loop (epsilon-greedy Double DQN, one decision per prompt) on looked-up outcomes.

    With a constrained objective the reward is objective - multiplier x constraint and the multiplier
    takes a projected gradient step on each episode's constraint (dual ascent); returns the final one.
    """
    cfg = replace(dqn, seed=seed)
    state_dim = len(env.state(Cell(0, 0, 0)))
    agent = DoubleDQNAgent(state_dim, len(env.labels), cfg)
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(len(env.prompts))
    records, multiplier = [], 0.0
    for episode in tqdm(range(episodes), desc=f"train offline [seed {seed}]", disable=not progress, mininterval=1):
        cell = env.draw(rng, int(order[episode % len(order)]))
        state = env.state(cell)
        epsilon = linear_epsilon(cfg, episode, episodes)
        index, explored, _ = agent.act(state, epsilon)
        outcome = env.outcome(cell, index)
        if env.constrained:
            violation = float(env.constraint[cell.calibration, cell.prompt, index])
            outcome = replace(outcome, reward=float(env.objective[cell.calibration, cell.prompt, index])
                              - multiplier * violation)
            multiplier = max(0.0, multiplier + env.reward_cfg.multiplier_lr * violation)
        loss = agent.store_and_learn(state, index, outcome.reward, state, True)
        prompt, out = env.prompts[cell.prompt], env.outcomes[cell.prompt]
        records.append(EpisodeRecord(
            episode=episode, step=agent.steps, prompt_id=prompt.id, category=prompt.category,
            prompt_tokens=out.context_tokens, complexity=float(env.features[cell.prompt].complexity),
            scenario=env.level(cell), action_index=index, explored=explored, epsilon=epsilon,
            outcome=outcome, loss=loss, hardware=[float(v) for v in env.hardware(cell).vector],
            truncated=out.truncated))
    return agent, records, multiplier
