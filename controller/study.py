"""One offline comparison end to end: fit the arms and train every seed on the training split, then
score policy, ablations and fitted arms on the test split's cells.

Why one function: test mode (from checkpoints) and the sweeps (bench/offline_sweep.py, from two runs'
metrics.json, no model) must build the arms the same way, or a sweep point would not be the result
a test run reports.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from common.config import DQNConfig
from controller.arms import ARM_NAMES, PROMPT_ARMS, FittedArms, fit_arms
from controller.trainer import greedy_chooser, train_offline
from environments.precomputed import Chooser, OfflineEnvironment, evaluate_offline, reads_lookahead

POLICY = "policy"
NO_PROMPT = "no_prompt"     # trained beside every policy that sees the prompt: what the prompt features add


def side_ablations(ablation: str) -> tuple[str, ...]:
    """Ablations trained beside a policy of this ablation: no_prompt for the full state, none otherwise."""
    return (NO_PROMPT,) if ablation == "none" else ()


def policy_chooser(env: OfflineEnvironment, agent, ablation: str) -> Chooser:
    """Greedy action of `agent` in a test cell, on the state its training saw (its ablation applied)."""
    choose = greedy_chooser(agent)
    return lambda cell: choose(env.state(cell, ablation))


def arms(env: OfflineEnvironment, policies: Mapping[str, tuple[Sequence, str]],
         fitted: FittedArms) -> dict[str, list[Chooser]]:
    """name -> one chooser per seed: each policy (its agents, its ablation), then every fitted arm."""
    out = {name: [policy_chooser(env, a, ablation) for a in agents] for name, (agents, ablation) in policies.items()}
    return out | {name: [fitted.chooser(name, env)] for name in ARM_NAMES}


def lookahead_arms(policies: Mapping[str, tuple[Sequence, str]]) -> list[str]:
    """The arms a "...+lookahead" state's look-ahead is charged to: those that read the prompt part of the state
    (each policy but a no-prompt one, the prompt-reading fitted arms)."""
    return [name for name, (_, ablation) in policies.items() if reads_lookahead(ablation)] + list(PROMPT_ARMS)


def run_study(train: OfflineEnvironment, test: OfflineEnvironment, state_names: list[str], dqn: DQNConfig,
              episodes: int, seeds: Sequence[int], draws: int, seed: int) -> dict:
    """Fitted arms and policies from `train` alone, every arm scored on `test` (metrics.json's offline_test)."""
    runs = [train_offline(train, replace(dqn, seed=s), episodes, s, progress=False) for s in seeds]
    fitted = fit_offline_arms(train, state_names, draws, seed, [m for _, _, m in runs])
    if test.constrained:
        test.set_multiplier(fitted.multiplier)
    policies = {POLICY: ([a for a, _, _ in runs], train.ablation)}
    for ablation in side_ablations(train.ablation):
        policies[ablation] = ([train_offline(train.with_ablation(ablation), replace(dqn, seed=s), episodes, s,
                                             progress=False)[0] for s in seeds], ablation)
    return evaluate_offline(test, arms(test, policies, fitted), draws, seed, lookahead_arms(policies))


def fit_offline_arms(train: OfflineEnvironment, state_names: list[str], draws: int, seed: int,
                          multipliers: Sequence[float]) -> FittedArms:
    """The arms, fitted (for a constrained objective) at the policies' mean final multiplier, so
    every arm is scored on one Lagrangian reward."""
    if train.constrained:
        train.set_multiplier(sum(multipliers) / len(multipliers))
    return replace(fit_arms(train, state_names, draws, seed), multiplier=train.multiplier)
