"""How well a Q-network fitted on a training run's transitions predicts rewards on held-out prompts.

Why: with one decision per prompt the Q-network is a reward regressor, and with ~160 training
prompts it can memorise each prompt's rewards from the prompt features. This refits fresh agents on
the replay buffer of a checkpoint (prompts split by a seeded draw, a quarter held out) under a few
settings and prints the held-out MSE of Q(s, a) against the reward, averaged over seeds.

    PYTHONPATH=. python bench/q_generalization.py checkpoints/adaptive.pt reports/train-.../metrics.json
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from controller.checkpointing import load_checkpoint
from controller.dqn import DoubleDQNAgent, DQNConfig
from environments.state import state_feature_names


def held_out_mse(states: np.ndarray, actions: np.ndarray, rewards: np.ndarray, prompt_ids: list[str],
                 cfg: DQNConfig, n_actions: int, seed: int) -> float:
    prompts = sorted(set(prompt_ids))
    held = set(np.random.default_rng(seed).choice(prompts, len(prompts) // 4, replace=False))
    is_held = np.array([p in held for p in prompt_ids])
    agent = DoubleDQNAgent(states.shape[1], n_actions, replace(cfg, seed=seed))
    for i in np.flatnonzero(~is_held):
        agent.store_and_learn(states[i], int(actions[i]), float(rewards[i]), states[i], True)
    predicted = np.array([agent.q_values(states[i])[actions[i]] for i in np.flatnonzero(is_held)])
    return float(np.mean((predicted - rewards[is_held]) ** 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training checkpoint saved with its replay buffer")
    parser.add_argument("metrics", help="the same run's metrics.json (prompt id of each transition)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    payload = load_checkpoint(args.checkpoint)
    buffer = payload["agent"].get("buffer")
    if not buffer:
        raise SystemExit(f"{args.checkpoint} has no replay buffer (trained with --no-save-buffer)")
    episodes = [e for e in json.load(open(args.metrics))["episodes"] if e.get("outcome")]
    n = len(episodes)
    states = np.asarray(buffer["states"])[:n]
    actions, rewards = np.asarray(buffer["actions"])[:n], np.asarray(buffer["rewards"])[:n]
    if not np.allclose(rewards, [e["outcome"]["reward"] for e in episodes], atol=1e-4):
        raise SystemExit("the buffer does not match the metrics' episodes: pass the same run's files")
    prompt_ids = [e["prompt_id"] for e in episodes]
    n_actions, hw = len(payload["action_space"]), sum(f.startswith("hw.") for f in state_feature_names())
    no_prompt, no_hw = states.copy(), states.copy()
    no_prompt[:, hw:] = 0.0
    no_hw[:, :hw] = 0.0
    base = DQNConfig(weight_decay=0.0)
    variants = [("weight decay 0", states, base), ("weight decay 1e-2 (default)", states, replace(base, weight_decay=1e-2)),
                ("weight decay 1e-1", states, replace(base, weight_decay=1e-1)),
                ("16 gradient steps", states, replace(base, gradient_steps=16)),
                ("prompt features zeroed", no_prompt, base), ("hardware features zeroed", no_hw, base)]
    print(f"{n} transitions, {len(set(prompt_ids))} prompts, a quarter held out; held-out MSE of Q(s,a) vs reward")
    for label, x, cfg in variants:
        mses = [held_out_mse(x, actions, rewards, prompt_ids, cfg, n_actions, seed) for seed in range(args.seeds)]
        print(f"  {label:28s} {np.mean(mses):.3f}  (seeds: {', '.join(f'{m:.3f}' for m in mses)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
