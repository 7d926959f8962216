"""The fitted arms: baselines a learned policy could lose to, each fitted on the training prompts and calibrations only.

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

``ARMS`` is the one registry: each arm is a fit (training data -> plain numbers stored in the
checkpoint) and a chooser (those numbers + a test environment -> an action per cell). Adding an arm
is one ``Arm`` entry here; reporting reads ``ARM_NAMES``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:   # the registry stays importable without torch (reporting reads ARM_NAMES)
    from environments.precomputed import Cell, Chooser, OfflineEnvironment

log = logging.getLogger(__name__)

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
class TrainingData:
    """Every training cell with its state and the reward of every action: what each arm is fitted on."""
    env: "OfflineEnvironment"
    cells: list["Cell"]
    states: np.ndarray          # [N, D]
    rewards: np.ndarray         # [N, A]
    levels: np.ndarray          # [N] load level of each cell
    state_names: list[str]


@dataclass(frozen=True)
class Arm:
    name: str
    fit: Callable[[TrainingData], dict]                          # -> plain numbers (JSON-able)
    chooser: Callable[[dict, "OfflineEnvironment"], "Chooser"]   # (those numbers, test env) -> cell -> action
    describe: Callable[[dict, list[str]], str]                   # (those numbers, action labels) -> one line
    reads_prompt: bool = False      # decides on the prompt features too: pays a "...+lookahead" state's look-ahead


def training_data(env: OfflineEnvironment, state_names: list[str], draws: int, seed: int) -> TrainingData:
    cells = env.cells(draws, seed)
    states = np.array([env.state(c, "none") for c in cells])
    rewards = np.array([env.reward[c.calibration, c.prompt] for c in cells])
    return TrainingData(env, cells, states, rewards, np.array([env.level(c) for c in cells]), state_names)


def fit_per_level(data: TrainingData) -> dict:
    """The best mean-reward action of each load level."""
    return {"per_level": {lv: int(np.argmax(data.rewards[data.levels == lv].mean(0))) for lv in data.env.levels}}


def fit_worst_case(data: TrainingData) -> dict:
    """The best action of the level that slows the dense model most, used everywhere."""
    env = data.env
    slowdown = {lv: np.median([env.calibration_set.slowdown(c) for c in env.cals if c.level == lv]) for lv in env.levels}
    worst = max(env.levels, key=lambda lv: slowdown[lv])
    return {"level": worst, "action": fit_per_level(data)["per_level"][worst]}


def fit_rule(data: TrainingData) -> dict:
    """The best (hardware feature, threshold, action below, action above) by mean training reward."""
    states, rewards = data.states, data.rewards
    best: ThresholdRule | None = None
    for i, name in enumerate(data.state_names):
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
    return asdict(best)


def fit_regressor(data: TrainingData) -> dict:
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(data.states)
    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(scaler.transform(data.states), data.rewards)
    return asdict(RidgeRegressor(mean=scaler.mean_.tolist(), scale=scaler.scale_.tolist(), coef=model.coef_.tolist(),
                                 intercept=np.atleast_1d(model.intercept_).tolist(), alpha=float(model.alpha_)))


def _g(x: float) -> str:
    return f"{x:.3g}"


ARMS: tuple[Arm, ...] = (
    Arm("per_level_static", fit_per_level, lambda p, env: lambda cell: p["per_level"][env.level(cell)],
        lambda p, a: "best static per level: " + ", ".join(f"{lv} → `{a[i]}`" for lv, i in p["per_level"].items())),
    Arm("worst_case_static", fit_worst_case, lambda p, env: lambda cell: p["action"],
        lambda p, a: f"worst level `{p['level']}` → `{a[p['action']]}` everywhere"),
    Arm("rule", fit_rule, lambda p, env: lambda cell, r=ThresholdRule(**p): r.choose(env.state(cell, "none")),
        lambda p, a: f"rule: `{p['feature']}` ≤ {_g(p['threshold'])} → `{a[p['below']]}`, else `{a[p['above']]}` "
                     f"(training reward {_g(p['train_reward'])})"),
    Arm("regressor", fit_regressor,
        lambda p, env: lambda cell, m=RidgeRegressor(**p): m.choose(env.state(cell, "none")),
        lambda p, a: f"regressor: ridge, penalty {_g(p['alpha'])} chosen by leave-one-out on training cells",
        reads_prompt=True),
)
ARM_NAMES = tuple(arm.name for arm in ARMS)
PROMPT_ARMS = tuple(arm.name for arm in ARMS if arm.reads_prompt)   # priced with a look-ahead state's look-ahead


@dataclass
class FittedArms:
    params: dict[str, dict]      # arm name -> its fitted numbers
    fitted_on: dict              # the training prompts and calibrations, for the record and the leak test
    multiplier: float = 0.0      # the Lagrange multiplier of a constrained objective they were fitted at
    registry: dict[str, Arm] = field(default_factory=lambda: {a.name: a for a in ARMS}, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"arms": self.params, "fitted_on": self.fitted_on, "multiplier": self.multiplier}

    @classmethod
    def from_dict(cls, d: dict) -> "FittedArms":
        """Reads today's layout and the one checkpoints wrote before the registry (fixed fields per arm)."""
        if "arms" in d:
            params = d["arms"]
        else:
            params = {"per_level_static": {"per_level": d["per_level"]},
                      "worst_case_static": {"level": d["worst_level"], "action": d["worst_case"]},
                      "rule": d["rule"], "regressor": d["regressor"]}
        return cls(params, d["fitted_on"], d.get("multiplier", 0.0))

    def chooser(self, name: str, env: OfflineEnvironment) -> Chooser:
        """A test-cell chooser of `env` (the test split) for one arm."""
        if name not in self.params:
            raise ValueError(f"unknown arm '{name}': choose from {', '.join(self.params)}")
        return self.registry[name].chooser(self.params[name], env)

    def describe(self, labels: list[str]) -> list[str]:
        """One line per fitted arm, in registry order (the report's "arms fitted" section)."""
        return [self.registry[name].describe(p, labels) for name, p in self.params.items() if name in self.registry]


def fit_arms(env: OfflineEnvironment, state_names: list[str], draws: int, seed: int) -> FittedArms:
    """Every arm from the training environment alone (its prompts, calibrations and telemetry); an arm that reads no
    prompt feature is fitted on the rewards without a look-ahead state's look-ahead, which it would not run."""
    data, static = {True: training_data(env, state_names, draws, seed)}, env.static()
    data[False] = replace(data[True], env=static, rewards=static.reward[[c.calibration for c in data[True].cells],
                                                                        [c.prompt for c in data[True].cells]])
    params = {arm.name: arm.fit(data[arm.reads_prompt]) for arm in ARMS}
    labels = env.labels
    rule = params["rule"]
    log.info("arms: per level %s, worst case (%s) %s, rule %s <= %.3f ? %s : %s",
             {lv: labels[a] for lv, a in params["per_level_static"]["per_level"].items()},
             params["worst_case_static"]["level"], labels[params["worst_case_static"]["action"]], rule["feature"],
             rule["threshold"], labels[rule["below"]], labels[rule["above"]])
    fitted_on = {"prompts": [p.id for p in env.prompts],
                 "calibrations": [[c.level, c.round] for c in env.cals]}
    return FittedArms(params, fitted_on)
