"""The headroom of per-prompt pruning: how much per-prompt damage varies, how reliably it is measured, how
well each signal predicts it on held-out prompts, and what routing by it buys at equal compute (issue 27).

Why these numbers: a per-prompt policy can only gain where damage varies between prompts more than its
measurement noise, and only as far as its signal ranks prompts. The ceiling of any predictor's correlation
is sqrt(split-half reliability) of the damage measure. At equal compute (half the prompts at intensity 2r,
half dense, against r on all), the oracle half is the upper bound; random routing loses to uniform when
damage is convex in intensity. A predictor earns its place by the share of the oracle's gain over uniform
it captures.

Predictors are ridge regressions on standardised features, the penalty chosen by leave-one-out on the
training prompts only (``RidgeCV``); every figure is on the held-out prompts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ALPHAS = np.logspace(-2, 4, 13)
KL_FLOOR = 1e-8


@dataclass
class PromptDamage:
    """One prompt: per action label, its log PPL ratio and token KL (whole reference and both halves), and
    its feature vectors by feature-set name."""
    log_ratio: dict[str, float]
    half_log_ratio: dict[str, tuple[float, float]]
    kl: dict[str, float]
    half_kl: dict[str, tuple[float, float]]
    features: dict[str, list[float]]


def reliability(halves: np.ndarray) -> float:
    """Split-half reliability: Pearson r of the two halves across prompts, Spearman-Brown corrected to the
    whole reference (2r / (1 + r))."""
    r = float(np.corrcoef(halves[:, 0], halves[:, 1])[0, 1])
    return 2 * r / (1 + r) if r > -1 else float("nan")


def log_kl(values: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(values, KL_FLOOR))


def damage(prompts: Sequence[PromptDamage], label: str, measure: str = "log_ratio") -> np.ndarray:
    if measure == "log_ratio":
        return np.array([p.log_ratio[label] for p in prompts])
    return log_kl(np.array([p.kl[label] for p in prompts]))


def halves(prompts: Sequence[PromptDamage], label: str, measure: str = "log_ratio") -> np.ndarray:
    if measure == "log_ratio":
        return np.array([p.half_log_ratio[label] for p in prompts])
    return log_kl(np.array([p.half_kl[label] for p in prompts]))


def features(prompts: Sequence[PromptDamage], name: str) -> np.ndarray:
    return np.array([p.features[name] for p in prompts], dtype=np.float64)


def fit_predict(train: Sequence[PromptDamage], held: Sequence[PromptDamage], feature_set: str, label: str,
                measure: str = "log_ratio") -> np.ndarray:
    """Held-out predictions of ``label``'s damage from ``feature_set``, fitted on the training prompts only."""
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
    model.fit(features(train, feature_set), damage(train, label, measure))
    return model.predict(features(held, feature_set))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic)


@dataclass
class ActionRow:
    label: str
    ppl_ratio: float                  # exp(mean log PPL ratio) over held-out prompts
    p10: float
    p90: float
    reliability: float                # of the log PPL ratio
    reliability_kl: float             # of the log token KL
    prediction: dict[str, float]      # feature set -> held-out Spearman of its prediction with the log PPL ratio


def action_rows(train: Sequence[PromptDamage], held: Sequence[PromptDamage], labels: Sequence[str],
                feature_sets: Sequence[str]) -> list[ActionRow]:
    rows = []
    for label in labels:
        d = damage(held, label)
        rows.append(ActionRow(label, float(np.exp(d.mean())), float(np.exp(np.quantile(d, 0.1))),
                              float(np.exp(np.quantile(d, 0.9))), reliability(halves(held, label)),
                              reliability(halves(held, label, "kl")),
                              {s: spearman(fit_predict(train, held, s, label), d) for s in feature_sets}))
    return rows


@dataclass
class RoutingRow:
    target: str
    low: str                          # the uniform action (intensity r on every prompt)
    high: str                         # the routed action (2r on half the prompts, dense on the rest)
    uniform: float                    # mean log PPL ratio over held-out prompts
    random: float
    oracle: float
    routed: dict[str, float]          # predictor -> mean log PPL ratio when it picks the half
    gain_ci: dict[str, tuple[float, float]]   # predictor -> 95 % bootstrap CI (over held-out prompts) of
                                              # uniform - routed (> 0: routing beats uniform)

    def share(self, predictor: str) -> float:
        """Share of the oracle's gain over uniform that routing by ``predictor`` captures (negative: it loses
        to uniform)."""
        gain = self.uniform - self.oracle
        return (self.uniform - self.routed[predictor]) / gain if gain > 0 else float("nan")


def route(scores: np.ndarray, damage_high: np.ndarray) -> float:
    """Mean damage when the half of the prompts with the lowest ``scores`` get the high action, the rest none."""
    half = len(damage_high) // 2
    chosen = np.argsort(scores, kind="stable")[:half]
    return float(damage_high[chosen].sum() / len(damage_high))


def gain_interval(scores: np.ndarray, d_low: np.ndarray, d_high: np.ndarray, draws: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap over prompts (predictions held fixed) of uniform - routed mean damage."""
    rng = np.random.default_rng(seed)
    n = len(d_high) - len(d_high) % 2
    gains = []
    for _ in range(draws):
        idx = rng.integers(0, len(d_high), n)
        gains.append(d_low[idx].mean() - route(scores[idx], d_high[idx]))
    low, high = np.percentile(gains, [2.5, 97.5])
    return float(low), float(high)


def routing_row(train: Sequence[PromptDamage], held: Sequence[PromptDamage], low: str, high: str,
                predictors: Sequence[tuple[str, str, str]]) -> RoutingRow:
    """``predictors``: (name, feature set, measure the ridge is fitted to: "log_ratio" or "kl")."""
    if len(held) % 2:
        held = held[:-1]               # an even count: half at 2r spends exactly the compute of r on all
    d_low, d_high = damage(held, low), damage(held, high)
    scores = {name: fit_predict(train, held, fs, high, measure) for name, fs, measure in predictors}
    return RoutingRow(low.split(":")[0], low, high, float(d_low.mean()), float(d_high.mean() / 2),
                      route(d_high, d_high), {name: route(s, d_high) for name, s in scores.items()},
                      {name: gain_interval(s, d_low, d_high) for name, s in scores.items()})


def cross_action_spearman(held: Sequence[PromptDamage], a: str, b: str) -> float:
    return spearman(damage(held, a), damage(held, b))


def render(rows: Sequence[ActionRow], routing: Sequence[RoutingRow], feature_sets: Sequence[str],
           n_train: int, n_held: int) -> str:
    """Markdown: the damage table and the equal-compute table."""
    out = [f"Held-out prompts: {n_held} (predictors fitted on {n_train} training prompts).", "",
           "| action | PPL ratio (geo. mean) | p10-p90 | split-half rel. log PPL | rel. log KL | sqrt(rel.) | "
           + " | ".join(f"Spearman: {s}" for s in feature_sets) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(feature_sets)]
    for r in rows:
        ceiling = np.sqrt(max(r.reliability, 0.0))
        out.append(f"| {r.label} | {r.ppl_ratio:.2f} | {r.p10:.2f}-{r.p90:.2f} | {r.reliability:.2f} | "
                   f"{r.reliability_kl:.2f} | {ceiling:.2f} | "
                   + " | ".join(f"{r.prediction[s]:.2f}" for s in feature_sets) + " |")
    if routing:
        names = list(routing[0].routed)
        out += ["", "Equal compute, mean log PPL ratio over held-out prompts (lower is better); in brackets the "
                "share of the oracle's gain over uniform each predictor captures:", "",
                "| target | uniform r | random half at 2r | oracle half | " + " | ".join(names) + " |",
                "|---|---|---|---|" + "---|" * len(names)]
        for g in routing:
            out.append(f"| {g.target} ({g.low} vs {g.high}) | {g.uniform:.3f} | {g.random:.3f} | {g.oracle:.3f} | "
                       + " | ".join(f"{g.routed[n]:.3f} ({_share_text(g.share(n))})" for n in names) + " |")
        out += ["", "95 % bootstrap CI of uniform - routed (> 0: routing beats uniform):", ""]
        for g in routing:
            out.append(f"- {g.target}: " + "; ".join(f"{n} [{a:+.3f}, {b:+.3f}]" for n, (a, b) in g.gain_ci.items()))
    return "\n".join(out)


def _share_text(share: float) -> str:
    """A share, or why there is none: when even the oracle half loses to uniform there is no gain to share."""
    return "no oracle gain" if np.isnan(share) else f"{share:+.0%}"
