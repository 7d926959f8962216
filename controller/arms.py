"""Baselines a learned policy could lose to, each fitted on the training prompts and calibrations only.

Why: a policy that beats every single static action can still lose to a static action per load
level, or to "CPU busy -> prune layers, else dense" (issue 16 found that two-line rule tying the
headline result). Each baseline is fitted from an OfflineEnvironment of the *training* split, so
test prompts and test calibrations cannot reach it, and stored in the checkpoint as plain numbers:

- ``per_level_static``: the best mean-reward action of each load level (it is told the level);
- ``worst_case_static``: the best action of the level that slows the dense model most, everywhere;
- ``rule``: one hardware feature, one threshold, one action on each side, chosen by training reward
  over every hardware feature and a grid of its quantiles;
- ``regressor``: a supervised per-action reward model on the policy's own state (standardised
  features, multi-output ridge with its penalty chosen by leave-one-out on the training cells),
  acting greedily: the contextual-bandit baseline with full-information training data.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from environments.precomputed import Cell, OfflineEnvironment

log = logging.getLogger(__name__)

BASELINES = ("per_level_static", "worst_case_static", "rule", "regressor")
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 13))
RULE_QUANTILES = tuple(float(q) for q in np.linspace(0.05, 0.95, 19))


@dataclass
class ThresholdRule:
    feature: str
    index: int              # slot in the state vector
    threshold: float
    below: int              # action index when state[index] <= threshold
    above: int
    train_reward: float

    def choose(self, state: np.ndarray) -> int:
        return self.below if state[self.index] <= self.threshold else self.above


@dataclass
class RidgeRegressor:
    """Reward of each action = ((state - mean) / scale) @ coef.T + intercept."""
    mean: list[float]
    scale: list[float]
    coef: list[list[float]]     # [actions, features]
    intercept: list[float]
    alpha: float

    def predict(self, state: np.ndarray) -> np.ndarray:
        x = (np.asarray(state, dtype=float) - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.asarray(self.coef) @ x + np.asarray(self.intercept)

    def choose(self, state: np.ndarray) -> int:
        return int(np.argmax(self.predict(state)))


@dataclass
class FittedBaselines:
    per_level: dict[str, int]
    worst_level: str
    worst_case: int
    rule: ThresholdRule
    regressor: RidgeRegressor
    fitted_on: dict              # the training prompts and calibrations, for the record and the leak test
    multiplier: float = 0.0      # the Lagrange multiplier of a constrained objective they were fitted at

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FittedBaselines":
        return cls(d["per_level"], d["worst_level"], d["worst_case"], ThresholdRule(**d["rule"]),
                   RidgeRegressor(**d["regressor"]), d["fitted_on"], d.get("multiplier", 0.0))

    def chooser(self, name: str, env: OfflineEnvironment):
        """A test-cell chooser of `env` (the test split) for one baseline."""
        if name == "per_level_static":
            return lambda cell: self.per_level[env.level(cell)]
        if name == "worst_case_static":
            return lambda cell: self.worst_case
        if name == "rule":
            return lambda cell: self.rule.choose(env.state(cell, "none"))
        if name == "regressor":
            return lambda cell: self.regressor.choose(env.state(cell, "none"))
        raise ValueError(f"unknown baseline '{name}': choose from {', '.join(BASELINES)}")


def training_matrix(env: OfflineEnvironment, draws: int, seed: int) -> tuple[list[Cell], np.ndarray, np.ndarray]:
    """(cells, states [N, D], rewards of every action [N, A]) over every training cell."""
    cells = env.cells(draws, seed)
    states = np.array([env.state(c, "none") for c in cells])
    rewards = np.array([env.reward[c.calibration, c.prompt] for c in cells])
    return cells, states, rewards


def fit_rule(states: np.ndarray, rewards: np.ndarray, names: list[str]) -> ThresholdRule:
    """The best (hardware feature, threshold, action below, action above) by mean training reward."""
    best: ThresholdRule | None = None
    for i, name in enumerate(names):
        if not name.startswith("hw."):
            continue
        column = states[:, i]
        for t in np.unique(np.quantile(column, RULE_QUANTILES)):
            low = column <= t
            below = int(np.argmax(rewards[low].mean(0))) if low.any() else 0
            above = int(np.argmax(rewards[~low].mean(0))) if (~low).any() else below
            value = float((rewards[low, below].sum() + rewards[~low, above].sum()) / len(column))
            if best is None or value > best.train_reward + 1e-12:
                best = ThresholdRule(name, i, float(t), below, above, value)
    if best is None:
        raise ValueError("the state has no hardware feature to threshold")
    return best


def fit_regressor(states: np.ndarray, rewards: np.ndarray) -> RidgeRegressor:
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(states)
    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(scaler.transform(states), rewards)
    return RidgeRegressor(mean=scaler.mean_.tolist(), scale=scaler.scale_.tolist(), coef=model.coef_.tolist(),
                          intercept=np.atleast_1d(model.intercept_).tolist(), alpha=float(model.alpha_))


def fit_baselines(env: OfflineEnvironment, state_names: list[str], draws: int, seed: int) -> FittedBaselines:
    """Every baseline from the training environment alone (its prompts, calibrations and telemetry)."""
    cells, states, rewards = training_matrix(env, draws, seed)
    levels = np.array([env.level(c) for c in cells])
    per_level = {lv: int(np.argmax(rewards[levels == lv].mean(0))) for lv in env.levels}
    slowdown = {lv: np.median([env.calibration_set.slowdown(c) for c in env.cals if c.level == lv]) for lv in env.levels}
    worst = max(env.levels, key=lambda lv: slowdown[lv])
    rule = fit_rule(states, rewards, state_names)
    log.info("baselines: per level %s, worst case (%s) %s, rule %s <= %.3f ? %s : %s",
             {lv: env.labels[a] for lv, a in per_level.items()}, worst, env.labels[per_level[worst]], rule.feature,
             rule.threshold, env.labels[rule.below], env.labels[rule.above])
    fitted_on = {"prompts": [p.id for p in env.prompts],
                 "calibrations": [[c.level, c.round] for c in env.cals]}
    return FittedBaselines(per_level, worst, per_level[worst], rule, fit_regressor(states, rewards), fitted_on)
