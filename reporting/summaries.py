"""Every summary number of a report, computed from the raw records of metrics.json.

Pure functions (records in, plain JSON-able dicts out) so that report.md, the console summary
and the stored ``summary`` block cannot disagree: all three are built from these dicts, and a
report regenerated from metrics.json alone gives the same numbers.

Conventions: speedup = dense time / pruned time (higher is better); ppl_ratio = pruned / dense
teacher-forced PPL (lower is better); an interval is a percentile bootstrap 95% CI of the mean
over prompts, seeded, so it is reproducible. Paired comparisons (regret, policy - best static)
bootstrap the per-prompt differences, which resamples prompts jointly for both arms.
"""
from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from common.markdown import is_number
from controller.arms import ARM_NAMES
from reporting.study.pricing import arm_pricing, offline_matrices
from environments.records import to_jsonable
from pruners.actions import PruningAction

METRICS = ("reward", "speedup", "ppl_ratio", "kl")
BUCKETS = ("low", "mid", "high")
ALL = "all"
DENSE = "none"
N_BOOT = 2000


# --------------------------------------------------------------------------- statistics

def bootstrap_ci(values: Iterable[float | None], seed: int = 0, n: int = N_BOOT,
                 level: float = 0.95) -> dict:
    """Mean with a percentile-bootstrap CI; non-finite and missing values are left out.

    Returns {"mean", "lo", "hi", "n"}; all None when no value is usable, lo == hi == mean for
    one value (a single observation has no spread to resample).
    """
    finite = _finite(values)
    if finite.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(finite.mean())
    if finite.size == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": 1}
    means = _resample_counts(finite.size, seed, n) @ finite / finite.size
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    # Percentiles of a float mean can miss the sample mean by rounding when all values are equal.
    return {"mean": mean, "lo": float(min(lo, mean)), "hi": float(max(hi, mean)), "n": int(finite.size)}


@functools.lru_cache(maxsize=32)
def _resample_counts(size: int, seed: int, n: int) -> np.ndarray:
    """(n, size) matrix: how often each observation appears in each bootstrap resample.

    Memoised (read-only) because a test summary asks for ~300 CIs over the same prompt count;
    reuse also makes every metric of a group share its resamples (common random numbers).
    """
    idx = np.random.default_rng(seed).integers(0, size, size=(n, size))
    flat = (idx + size * np.arange(n)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n * size).reshape(n, size).astype(float)
    counts.setflags(write=False)
    return counts


def paired_diff_ci(a: Sequence[float | None], b: Sequence[float | None], seed: int = 0,
                   n: int = N_BOOT) -> dict:
    """CI of mean(a - b) over pairs where both sides are finite (paired bootstrap over prompts)."""
    diffs = [x - y for x, y in zip(a, b) if is_number(x) and is_number(y)]
    return bootstrap_ci(diffs, seed=seed, n=n)


def mean_or_none(values: Iterable[float | None]) -> float | None:
    finite = _finite(values)
    return float(finite.mean()) if finite.size else None


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points, same length as the input (no lag trimming)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return []
    cumsum = np.concatenate([[0.0], np.cumsum(arr)])
    idx = np.arange(1, arr.size + 1)
    start = np.maximum(0, idx - max(1, window))
    return ((cumsum[idx] - cumsum[start]) / (idx - start)).tolist()


def default_window(n: int) -> int:
    """About 15 windows over a run, never fewer than 5 points each (or the whole run)."""
    return max(1, min(n, max(5, n // 15)))


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Labels of the non-dominated points for (speedup up, ppl_ratio down), by rising speedup."""
    usable = {k: p for k, p in points.items() if is_number(p[0]) and is_number(p[1])}
    front = [k for k, p in usable.items() if not any(_dominates(q, p) for q in usable.values())]
    return sorted(front, key=lambda k: (usable[k][0], usable[k][1], k))


def dominated_by(point: tuple[float, float], points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Labels of the points that are at least as good on both axes and better on one."""
    if not (is_number(point[0]) and is_number(point[1])):
        return []
    return sorted(k for k, q in points.items() if is_number(q[0]) and is_number(q[1]) and _dominates(q, point))


def _dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
    return q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])


def _finite(values: Iterable[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if is_number(v)], dtype=float)


# --------------------------------------------------------------------------- action labels

def _parsed(label: str) -> PruningAction | None:
    """The action a record's label names; None for labels that are no action (a failed decision's '#3')."""
    try:
        return PruningAction.parse(label)
    except ValueError:
        return None


def action_target(label: str) -> str:
    """'ffn_neurons:0.5' -> 'ffn_neurons'; a label that names no action is its own target."""
    action = _parsed(label)
    return action.target if action else label


def action_intensity(label: str) -> float:
    """'ffn_neurons:0.5' -> 0.5; 'none' and labels that name no action -> 0.0."""
    action = _parsed(label)
    return action.intensity if action else 0.0


def order_actions(labels: Iterable[str], action_space: Sequence[str] | None = None) -> list[str]:
    """Action-space order first (index order of the DQN), then any others sorted."""
    seen = set(labels)
    ordered = [a for a in (action_space or []) if a in seen]
    return ordered + sorted(seen - set(ordered))


# --------------------------------------------------------------------------- complexity buckets

def complexity_edges(values: Sequence[float]) -> list[float]:
    """Tertile edges of the observed complexity, so each bucket holds about a third of prompts."""
    finite = _finite(values)
    if finite.size == 0:
        return []
    return [float(x) for x in np.quantile(finite, [1 / 3, 2 / 3])]


def complexity_bucket(value: float, edges: Sequence[float]) -> str:
    """low: <= first edge, mid: <= second edge, high: above."""
    if not edges or not is_number(value):
        return BUCKETS[1]
    return BUCKETS[int(np.searchsorted(np.asarray(edges), value, side="left"))]


def _count(actions: Iterable[str], order: Sequence[str]) -> dict[str, int]:
    """{action: count} in ``order``, zero counts left out."""
    c = Counter(actions)
    return {a: int(c[a]) for a in order if c[a]}


def _counts_by(keys: Sequence[str], actions: Sequence[str], order: Sequence[str]) -> dict:
    """{key: {action: count}} with keys in first-seen order and actions in ``order``."""
    grouped: dict[str, list[str]] = {}
    for key, action in zip(keys, actions):
        grouped.setdefault(key, []).append(action)
    return {k: _count(v, order) for k, v in grouped.items()}


def _bucket_counts(complexities: Sequence[float], actions: Sequence[str], edges: Sequence[float],
                   order: Sequence[str]) -> dict:
    counts = _counts_by([complexity_bucket(c, edges) for c in complexities], actions, order)
    return {b: counts[b] for b in BUCKETS if b in counts}


# --------------------------------------------------------------------------- training

def per_episode_series(episodes: Sequence) -> dict:
    """Per-episode mean reward, last epsilon and mean loss (several records per multi-step episode)."""
    rows = to_jsonable(list(episodes))
    by_ep: dict[int, list[dict]] = {}
    for r in rows:
        by_ep.setdefault(int(r["episode"]), []).append(r)
    eps = sorted(by_ep)
    return {
        "episode": eps,
        "reward": [mean_or_none(_reward(r) for r in by_ep[e]) for e in eps],
        "epsilon": [by_ep[e][-1].get("epsilon") for e in eps],
        "loss": [mean_or_none(r.get("loss") for r in by_ep[e]) for e in eps],
    }


def windowed_action_shares(episodes: Sequence, action_space: Sequence[str] | None = None,
                           window: int | None = None) -> dict:
    """Share of each action in consecutive windows of decisions (what the action-usage plot stacks)."""
    rows = to_jsonable(list(episodes))
    labels = [_episode_action(r, action_space) for r in rows]
    order = order_actions(labels, action_space)
    window = window or default_window(len(labels))
    starts = list(range(0, len(labels), window))
    shares = {a: [] for a in order}
    for s in starts:
        chunk = Counter(labels[s:s + window])
        total = sum(chunk.values())
        for a in order:
            shares[a].append(chunk[a] / total)
    return {"window": window,
            "start": [rows[s]["episode"] for s in starts],
            "end": [rows[min(s + window, len(rows)) - 1]["episode"] for s in starts],
            "shares": shares}


def summarize_train(episodes: Sequence, action_space: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Headline and per-action figures of a training run (failed episodes counted, not averaged)."""
    rows = to_jsonable(list(episodes))
    ok = [r for r in rows if r.get("outcome")]
    labels = [_episode_action(r, action_space) for r in rows]
    order = order_actions(labels, action_space)
    window = max(1, len(ok) // 5)
    rewards = [_reward(r) for r in ok]
    greedy = [(r, a) for r, a in zip(rows, labels) if not r.get("explored")]
    edges = complexity_edges([r["complexity"] for r in rows])
    losses = [r.get("loss") for r in rows if is_number(r.get("loss"))]
    return {
        "n_episodes": len({r["episode"] for r in rows}),
        "n_decisions": len(rows),
        "n_failed": sum(1 for r in rows if r.get("failed") or not r.get("outcome")),
        "n_explored": sum(1 for r in rows if r.get("explored")),
        "reward": bootstrap_ci(rewards, seed=seed),
        "reward_first": mean_or_none(rewards[:window]),
        "reward_last": mean_or_none(rewards[-window:]),
        "window": window,
        "final_epsilon": rows[-1].get("epsilon") if rows else None,
        "loss_last": mean_or_none(losses[-window:]),
        "per_action": _train_per_action(rows, labels, order),
        "greedy_by_scenario": _counts_by([r["scenario"] for r, _ in greedy], [a for _, a in greedy], order),
        "complexity_edges": edges,
        "greedy_by_complexity": _bucket_counts([r["complexity"] for r, _ in greedy], [a for _, a in greedy],
                                               edges, order),
        "overhead": _overhead([r.get("controller_s") for r in ok], [r["outcome"] for r in ok]),
        "latency_check": latency_check([(r["scenario"], r["outcome"]) for r in ok]),
    }


def _train_per_action(rows: list[dict], labels: list[str], order: list[str]) -> dict:
    out = {}
    for a in order:
        mine = [r for r, lab in zip(rows, labels) if lab == a]
        outcomes = [r["outcome"] for r in mine if r.get("outcome")]
        out[a] = {
            "count": len(mine),
            "share": len(mine) / len(rows),
            "explored": sum(1 for r in mine if r.get("explored")),
            **{f"mean_{m}": mean_or_none(o.get(m) for o in outcomes) for m in METRICS},
            **_timing(outcomes),
        }
    return out


def _timing(outcomes: Sequence[dict]) -> dict:
    """Mean seconds of the generation parts, for the latency-breakdown table and plot."""
    return {k: mean_or_none(o.get(k) for o in outcomes) for k in ("prefill_s", "decode_s", "latency_s")}


def latency_check(pairs: Sequence[tuple[str, Mapping]]) -> dict:
    """How well the latencies the reward used (the latency table, scaled or measured under load)
    predict the generations the run timed live, per scenario (and over all): relative error
    measured / table - 1, its median (the table's bias; > 0: live runs were slower) and the mean
    of its absolute value. ``pairs``: (scenario, outcome) for outcomes with both latencies."""
    by: dict[str, list[float]] = {}
    for scenario, o in pairs:
        live, table = (o or {}).get("latency_s"), (o or {}).get("reward_latency_s")
        if is_number(live) and is_number(table) and live > 0 and table > 0:
            by.setdefault(scenario, []).append(live / table - 1.0)
    if len(by) > 1:
        by[ALL] = [e for errors in list(by.values()) for e in errors]
    return {g: {"n": len(e), "bias": float(np.median(e)), "error": float(np.mean(np.abs(e)))} for g, e in by.items()}


def _episode_action(row: dict, action_space: Sequence[str] | None) -> str:
    if row.get("outcome"):
        return row["outcome"]["action"]
    idx = row.get("action_index")
    if action_space and isinstance(idx, int) and 0 <= idx < len(action_space):
        return action_space[idx]
    return f"#{idx}"


def _reward(row: dict) -> float | None:
    return row["outcome"]["reward"] if row.get("outcome") else None


def _overhead(controller: Sequence[float | None], outcomes: Sequence[dict]) -> dict:
    """Mean seconds per decision: controller vs the generation it decides for."""
    out = {"controller_s": mean_or_none(controller), **_timing(outcomes)}
    model_s = out["latency_s"] if out["latency_s"] is not None else _sum_or_none(out["prefill_s"], out["decode_s"])
    total = _sum_or_none(out["controller_s"], model_s)
    out["controller_share"] = out["controller_s"] / total if total and out["controller_s"] is not None else None
    return out


def _sum_or_none(*xs: float | None) -> float | None:
    return sum(xs) if all(x is not None for x in xs) else None


# --------------------------------------------------------------------------- test

def summarize_test(prompts: Sequence, ablations: Mapping | None = None, action_space: Sequence[str] | None = None,
                   seed: int = 0) -> dict:
    """Policy vs every static action, dense, random and oracle, per scenario and over all prompts."""
    rows = to_jsonable(list(prompts))
    scenarios = sorted({r["scenario"] for r in rows})
    groups = scenarios + ([ALL] if len(scenarios) > 1 else [])
    edges = complexity_edges([r["complexity"] for r in rows])
    order = order_actions({a for r in rows for a in r["static"]} | {r["policy_action"] for r in rows}, action_space)
    by_scenario = {g: _test_group([r for r in rows if g == ALL or r["scenario"] == g], edges, order, seed)
                   for g in groups}
    return {
        "n_prompts": len(rows),
        "scenarios": scenarios,
        "groups": groups,
        "actions": order,
        "complexity_edges": edges,
        "by_scenario": by_scenario,
        "ablations": summarize_ablations(ablations or {}, rows, order, seed),
        "latency_check": latency_check([(r["scenario"], r["policy"]) for r in rows]),   # the policy's run is timed
    }


def best_static(rows: Sequence[Mapping], actions: Sequence[str] | None = None, pruning_only: bool = False) -> str | None:
    """The static action with the highest mean reward over these prompts (a hindsight choice).

    The one rule behind the report's "best static" (per scenario, and over all scenarios) and the
    static model ``--lm-eval`` scores: the mean is over the prompts where the action has a finite
    reward, and a tie goes to dense, then to the earlier action in ``actions`` (default: the rows'
    own order, the action space's). ``rows`` are PromptResults as metrics.json holds them (dicts).
    ``pruning_only`` leaves dense out, for a comparison that already shows it.
    """
    labels = actions if actions is not None else list(dict.fromkeys(a for r in rows for a in r["static"]))
    means = {a: mean_or_none(_static_metric(r, a, "reward") for r in rows)
             for a in labels if not (pruning_only and a == DENSE)}
    return max((a for a, m in means.items() if m is not None), key=lambda a: (means[a], a == DENSE), default=None)


def _test_group(rows: list[dict], edges: list[float], order: list[str], seed: int) -> dict:
    statics = [a for a in order if any(a in r["static"] for r in rows)]
    static = {a: _static_summary([r["static"].get(a) for r in rows], seed) for a in statics}
    best = best_static(rows, statics)
    policy_r = [r["policy"]["reward"] for r in rows]
    oracle_r = [r["oracle_reward"] for r in rows]
    random_r = [_random_metric(r, "reward") for r in rows]
    chosen = [r["policy_action"] for r in rows]
    policy = _metric_cis([r["policy"] for r in rows], seed)
    return {
        "n": len(rows),
        "policy": policy,
        "static": static,
        "best_static": best,
        "oracle": {"reward": bootstrap_ci(oracle_r, seed=seed),
                   **{m: bootstrap_ci([_oracle_metric(r, m) for r in rows], seed=seed) for m in METRICS[1:]}},
        "random": {m: bootstrap_ci([_random_metric(r, m) for r in rows], seed=seed) for m in METRICS},
        "regret": paired_diff_ci(oracle_r, policy_r, seed=seed),
        "vs_best_static": paired_diff_ci(policy_r, [_static_metric(r, best, "reward") for r in rows], seed=seed),
        "vs_random": paired_diff_ci(policy_r, random_r, seed=seed),
        "vs_dense": paired_diff_ci(policy_r, [_static_metric(r, DENSE, "reward") for r in rows], seed=seed),
        "policy_actions": _count(chosen, order),
        "oracle_actions": _count((r["oracle_action"] for r in rows), order),
        "oracle_agreement": sum(r["policy_action"] == r["oracle_action"] for r in rows) / len(rows) if rows else None,
        "aggressiveness": bootstrap_ci([action_intensity(a) for a in chosen], seed=seed),
        "by_complexity": _bucket_counts([r["complexity"] for r in rows], chosen, edges, order),
        "pareto": _pareto_summary(static, policy),
        "overhead": _overhead([r.get("controller_s") for r in rows], [r["policy"] for r in rows]),
    }


def _static_summary(outcomes: Sequence[dict | None], seed: int) -> dict:
    return {**_metric_cis(outcomes, seed), "timing": _timing([o for o in outcomes if o])}


def _metric_cis(outcomes: Sequence[dict | None], seed: int) -> dict:
    return {m: bootstrap_ci([o.get(m) if o else None for o in outcomes], seed=seed) for m in METRICS}


def _static_metric(row: dict, action: str | None, metric: str) -> float | None:
    outcome = row["static"].get(action) if action else None
    return outcome.get(metric) if outcome else None


def _oracle_metric(row: dict, metric: str) -> float | None:
    return _static_metric(row, row["oracle_action"], metric)


def _random_metric(row: dict, metric: str) -> float | None:
    """Expected value of a uniformly random action on this prompt: the mean over its static actions."""
    return mean_or_none(o.get(metric) for o in row["static"].values())


def _pareto_summary(static: Mapping[str, dict], policy: dict) -> dict:
    points = {a: (s["speedup"]["mean"], s["ppl_ratio"]["mean"]) for a, s in static.items()
              if s["speedup"]["mean"] is not None and s["ppl_ratio"]["mean"] is not None}
    policy_point = (policy["speedup"]["mean"], policy["ppl_ratio"]["mean"])
    if None in policy_point:
        return {"front": pareto_front(points), "policy_dominated_by": [], "policy_on_front": None}
    beaten = dominated_by(policy_point, points)
    return {"front": pareto_front(points), "policy_dominated_by": beaten, "policy_on_front": not beaten}


def summarize_ablations(ablations: Mapping, main_rows: Sequence[dict], order: Sequence[str], seed: int = 0) -> dict:
    """Each ablation's policy figures per scenario and its paired difference to the main policy."""
    main = {(r["prompt_id"], r["scenario"]): r["policy"]["reward"] for r in main_rows}
    out = {}
    for name, value in sorted(ablations.items()):
        rows = to_jsonable(list(value))
        scenarios = sorted({r["scenario"] for r in rows})
        groups = scenarios + ([ALL] if len(scenarios) > 1 else [])
        out[name] = {g: _ablation_group([r for r in rows if g == ALL or r["scenario"] == g], main, order, seed)
                     for g in groups}
    return out


def _ablation_group(rows: list[dict], main: Mapping, order: Sequence[str], seed: int) -> dict:
    paired = [(r["policy"]["reward"], main.get((r["prompt_id"], r["scenario"]))) for r in rows]
    chosen = [r["policy_action"] for r in rows]
    return {
        "n": len(rows),
        "policy": _metric_cis([r["policy"] for r in rows], seed),
        "vs_policy": paired_diff_ci([a for a, _ in paired], [b for _, b in paired], seed=seed),
        "aggressiveness": bootstrap_ci([action_intensity(a) for a in chosen], seed=seed),
        "actions": _count(chosen, order),
    }


# --------------------------------------------------------------------------- evaluation and baselines

def summarize_eval(evaluation: Mapping) -> dict:
    """Per model: PPL, PPL ratio to the dense model, accuracy per task and its mean, speed."""
    models = evaluation.get("models", {}) or {}
    tasks = sorted({t for m in models.values() for t in (m.get("tasks") or {})})
    dense_ppl = _dense_ppl(models)
    out = {}
    for label, m in models.items():
        wikitext = m.get("wikitext") or {}
        task_rows = {t: dict((m.get("tasks") or {}).get(t) or {}) for t in tasks}
        accs = [row.get("acc") for row in task_rows.values()]
        out[label] = {
            "ppl": wikitext.get("ppl"),
            "ppl_ratio": wikitext["ppl"] / dense_ppl if is_number(wikitext.get("ppl")) and dense_ppl else None,
            "tokens": wikitext.get("tokens_scored"),
            "protocol": dict(wikitext.get("protocol") or {}),
            "tasks": task_rows,
            # Over the same task set only: a model missing a task gets no mean rather than a biased one.
            "mean_acc": mean_or_none(accs) if accs and all(is_number(a) for a in accs) else None,
            "speed": dict(m.get("speed") or {}),
            "actions": dict(m.get("actions") or {}),
        }
    return {"models": out, "tasks": tasks}


def _dense_ppl(models: Mapping) -> float | None:
    dense = models.get("dense") or models.get(DENSE) or {}
    ppl = (dense.get("wikitext") or {}).get("ppl")
    return ppl if is_number(ppl) and ppl > 0 else None


def baseline_label(row: Mapping) -> str:
    budget = row.get("budget")
    return f"{row.get('method', '?')}@{budget:g}" if is_number(budget) else str(row.get("method", "?"))


def summarize_baselines(rows: Sequence[Mapping]) -> dict:
    """Pareto front of the static baselines on (speedup, PPL); the rows themselves stay in metrics."""
    points = {baseline_label(r): (r.get("speedup"), r.get("ppl")) for r in rows}
    return {"n": len(rows), "front": pareto_front(points)}


# --------------------------------------------------------------------------- offline study

POLICY = "policy"
REFERENCE_ARMS = ("random", "oracle")
OFFLINE_METRICS = ("reward", "ppl_ratio", "speedup", "slo_met")


def clustered_bootstrap_ci(values: np.ndarray, seed: int = 0, n: int = N_BOOT, level: float = 0.95) -> dict:
    """Mean of ``values[seed, prompt, calibration]`` with a percentile CI that resamples training seeds,
    prompts and calibrations independently, each with replacement.

    Clustered: a resampled prompt brings all of its cells (every calibration and seed), and likewise
    a resampled calibration and seed, so 37 prompts under two calibrations count as 37 prompts, not
    74 pairs, and the spread of the latency tables and of training enters the interval. NaN cells
    (a prompt without a calibration of that level) are left out of every mean.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 3:
        raise ValueError(f"values must be [seeds, prompts, calibrations], got shape {v.shape}")
    mask = np.isfinite(v)
    if not mask.any():
        return {"mean": None, "lo": None, "hi": None, "n": 0, "clusters": list(v.shape)}
    mean = float(v[mask].mean())
    means = clustered_resample_means(v, seed, n)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return {"mean": mean, "lo": float(min(lo, mean)), "hi": float(max(hi, mean)), "n": int(mask.sum()),
            "clusters": list(v.shape)}


def clustered_resample_means(values: np.ndarray, seed: int = 0, n: int = N_BOOT) -> np.ndarray:
    """The n bootstrap means behind clustered_bootstrap_ci: each resample draws seeds, prompts and
    calibrations with replacement (multinomial counts per axis) and weights every cell by the product."""
    mask = np.isfinite(values)
    filled, weight = np.where(mask, values, 0.0), mask.astype(float)
    rng = np.random.default_rng(seed)
    counts = [rng.multinomial(size, np.full(size, 1.0 / size), size=n).astype(float) for size in values.shape]
    num = np.einsum("bs,bp,bk,spk->b", *counts, filled, optimize=True)
    den = np.einsum("bs,bp,bk,spk->b", *counts, weight, optimize=True)
    return num[den > 0] / den[den > 0]


def _cube(per_cell: np.ndarray, keys: Sequence[tuple[str, int]], selected: np.ndarray) -> np.ndarray:
    """[seeds, cells] -> [seeds, prompts, rounds]: the mean over each (prompt, round)'s selected cells
    (its telemetry draws, and its levels when several are pooled); NaN where a pair has none."""
    prompts = sorted({p for (p, _), s in zip(keys, selected) if s})
    rounds = sorted({r for (_, r), s in zip(keys, selected) if s})
    pi, ri = {p: i for i, p in enumerate(prompts)}, {r: i for i, r in enumerate(rounds)}
    total = np.zeros((per_cell.shape[0], len(prompts), len(rounds)))
    count = np.zeros((len(prompts), len(rounds)))
    for i in np.flatnonzero(selected):
        p, r = pi[keys[i][0]], ri[keys[i][1]]
        total[:, p, r] += per_cell[:, i]
        count[p, r] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / np.where(count > 0, count, np.nan)


def _arm_values(ot: Mapping, name: str, matrix: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """[seeds, cells] of one metric for an arm, from its pricing's ``matrix`` and ``reward``: a chooser's actions,
    random (the mean over actions), oracle (the best-reward action), or a static action label."""
    cells = np.arange(matrix.shape[0])
    if name in ot["arms"]:
        return np.stack([matrix[cells, np.asarray(a, dtype=int)] for a in ot["arms"][name]])
    if name == "random":
        return matrix.mean(1)[None]
    if name == "oracle":
        return matrix[cells, reward.argmax(1)][None]
    return matrix[:, ot["actions"].index(name)][None]


def _paired(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b over seeds: paired seed by seed, a single-seed side broadcast over the other's seeds."""
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        k = min(a.shape[0], b.shape[0])
        a, b = a[:k], b[:k]
    return a - b


def summarize_offline(ot: Mapping, seed: int = 0) -> dict:
    """Per load level and pooled: every arm's reward (clustered CI), PPL ratio, speedup, SLO attainment,
    policy - arm with clustered CIs over seeds x prompts x calibrations, the spread across training
    seeds, and the verdict against the strongest fitted baseline."""
    pricings = offline_matrices(ot)
    keys = list(zip(ot["cells"]["prompt_id"], ot["cells"]["round"]))
    levels = np.asarray(ot["cells"]["level"])
    groups = list(ot["levels"]) + ([ALL] if len(ot["levels"]) > 1 else [])
    others = [a for a in ot["arms"] if a != POLICY and a not in ARM_NAMES]
    names = [POLICY, *ARM_NAMES, *others, *REFERENCE_ARMS, *ot["actions"]]
    values = {(arm, m): _arm_values(ot, arm, (mine := pricings[arm_pricing(ot, arm)])[m], mine["reward"])
              for arm in names for m in OFFLINE_METRICS}
    selections = {g: np.ones(len(keys), bool) if g == ALL else levels == g for g in groups}
    out = {}
    for g, sel in selections.items():
        cube = {k: _cube(v, keys, sel) for k, v in values.items()}
        policy = cube[(POLICY, "reward")]
        arms = {}
        for arm in names:
            row = {m: (clustered_bootstrap_ci(cube[(arm, m)], seed) if m == "reward"
                       else {"mean": float(np.nanmean(cube[(arm, m)]))}) for m in OFFLINE_METRICS}
            if arm != POLICY:
                row["vs"] = clustered_bootstrap_ci(_paired(policy, cube[(arm, "reward")]), seed)
            arms[arm] = row
        per_seed = np.nanmean(policy, axis=(1, 2))
        out[g] = {"n_cells": int(sel.sum()), "arms": arms,
                  "best_static": max(ot["actions"], key=lambda a: arms[a]["reward"]["mean"]),
                  "seeds": {"reward": per_seed.tolist(), "sd": float(per_seed.std(ddof=1)) if per_seed.size > 1 else 0.0,
                            "vs": {b: np.nanmean(_paired(policy, cube[(b, "reward")]), axis=(1, 2)).tolist()
                                   for b in ARM_NAMES}}}
    objective = ot.get("objective") or {"objective": "weighted"}
    for row in out.values():       # a constrained objective: which arms meet its constraint on these cells
        for arm in row["arms"].values():
            arm["meets_constraint"] = (arm["slo_met"]["mean"] >= objective["slo_share"] - 1e-12
                                       if objective["objective"] == "slo" else
                                       arm["ppl_ratio"]["mean"] <= objective["quality_budget"] + 1e-12
                                       if objective["objective"] == "quality" else None)
    pooled = out[groups[-1]]["arms"]
    strongest = max(ARM_NAMES, key=lambda b: pooled[b]["reward"]["mean"])
    result = {"groups": groups, "actions": list(ot["actions"]), "arms": names, "by_level": out, "objective": objective,
              "strongest_baseline": strongest, "verdict": offline_verdict(out, strongest),
              "n_seeds": len(ot["arms"][POLICY])}
    if "lookahead" in pricings:    # who paid the look-ahead, and what it costs: dense decided after it
        dense = pricings["lookahead"]["speedup"][:, ot["actions"].index(DENSE)]
        result["lookahead"] = {"arms": list(ot["lookahead"]["arms"]),
                               "dense_speedup": {g: float(dense[sel].mean()) for g, sel in selections.items()}}
    return result


def ci_sign(ci: Mapping) -> str:
    """'better' / 'worse' when the interval excludes zero, else 'no difference'."""
    if ci.get("lo") is not None and ci["lo"] > 0:
        return "better"
    if ci.get("hi") is not None and ci["hi"] < 0:
        return "worse"
    return "no difference"


def offline_verdict(by_level: Mapping, strongest: str) -> dict:
    """Computed, never typed: per group, the sign of policy - each baseline; the claim is made only
    against the strongest baseline (highest pooled reward) and only where its CI excludes zero."""
    signs = {g: {b: ci_sign(row["arms"][b]["vs"]) for b in (*ARM_NAMES, "random")} for g, row in by_level.items()}
    wins = [g for g in by_level if signs[g][strongest] == "better"]
    losses = [g for g in by_level if signs[g][strongest] == "worse"]
    if wins and not losses:
        claim = f"the policy beats the strongest baseline ({strongest}) in {', '.join(wins)}"
    elif losses and not wins:
        claim = f"the policy loses to the strongest baseline ({strongest}) in {', '.join(losses)}"
    elif wins:
        claim = (f"mixed: the policy beats {strongest} in {', '.join(wins)} and loses in {', '.join(losses)}")
    else:
        claim = f"no difference from the strongest baseline ({strongest}) in any group: every CI includes zero"
    return {"signs": signs, "wins": wins, "losses": losses, "claim": claim}


CPU_LOAD_FEATURES = ("cpu_util", "process_cpu_util", "load_per_core", "ram_used_frac", "swap_used_frac")


def load_feature_names() -> list[str]:
    """The telemetry slots that describe load, in state order: CPU and memory load from the basic
    telemetry, then every slot the contention state adds (validity flags ``*_ok`` left out). What the
    report's per-level table and the load-features plot show."""
    from machine.load_signals import BASIC, CONTENTION, hardware_feature_names

    basic = hardware_feature_names(BASIC)
    added = [n for n in hardware_feature_names(CONTENTION) if n not in basic and not n.endswith("_ok")]
    return [n for n in basic if n in CPU_LOAD_FEATURES] + added


def summarize_calibrations(cal: Mapping) -> dict:
    """Per level: its dense slowdown per calibration, each action's speedup spread across calibrations,
    and how well the training calibrations' mean latency predicts each held-out (test) calibration."""
    from environments.latency_calibration import CalibrationSet
    from machine.load_signals import hardware_feature_names

    cs = CalibrationSet.from_dict(dict(cal))
    names = hardware_feature_names("contention")
    out = {}
    for level in cs.levels:
        cals = [c for c in cs.calibrations if c.level == level]
        keys = sorted({k for c in cals for k, e in c.table.entries.items() if e.samples > 0})
        speedups = {k: [c.table.entries[k].speedup(16) for c in cals if k in c.table.entries] for k in keys}
        train = {k: np.mean([c.table.entries[k].latency(16) for c in cals if c.split == "train"]) for k in keys}
        errors = [abs(c.table.entries[k].latency(16) / train[k] - 1.0) for c in cals if c.split == "test"
                  for k in keys if k in c.table.entries and np.isfinite(train[k])]
        telemetry = np.array([v for c in cals for v in c.telemetry]) if any(c.telemetry for c in cals) else None
        out[level] = {
            "slowdown": [cs.slowdown(c) for c in cals], "seconds": sum(c.seconds for c in cals),
            "speedup": {k.split("|", 2)[2] + ("" if k.split("|")[1] == "short" else " (long)"):
                        {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                        for k, v in speedups.items()},
            "heldout_latency_error": float(np.mean(errors)) if errors else None,
            "features": ({n: {"mean": float(telemetry[:, i].mean()), "sd": float(telemetry[:, i].std())}
                          for i, n in enumerate(names[: telemetry.shape[1]])} if telemetry is not None else {}),
        }
    idle = out.get("idle", {}).get("features", {})
    for level, row in out.items():    # separation from idle in idle-sd units: which feature tells this level apart
        row["separation"] = {n: abs(f["mean"] - idle[n]["mean"]) / max(1e-9, (f["sd"] + idle[n]["sd"]) / 2)
                             for n, f in row["features"].items() if n in idle} if level != "idle" else {}
    return out


def summarize_quality(outcomes: Mapping) -> dict:
    """Split-half reliability of each action's per-prompt log PPL ratio (Pearson r between the two
    halves of the reference, and Spearman-Brown's full-length estimate), and how often pruning
    'improves' a prompt's PPL (what a noisy quality signal produces)."""
    rows = list(outcomes.values())
    labels = sorted({a for r in rows for a in r["actions"]})
    per_action = {}
    for a in labels:
        pairs = [r["actions"][a]["half_log_ratio"] for r in rows
                 if a in r["actions"] and not r["actions"][a]["inert"]]
        if len(pairs) < 3:
            continue
        x, y = np.asarray(pairs, dtype=float).T
        r_half = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else None
        scored = [r["actions"][a] for r in rows if a in r["actions"] and not r["actions"][a]["inert"]]
        with_prompt = [(q["prompt_kl"], float(np.log(q["ppl_ratio"]))) for q in scored
                       if is_number(q.get("prompt_kl")) and is_number(q["ppl_ratio"]) and q["ppl_ratio"] > 0]
        per_action[a] = {"n": len(pairs), "r_half": r_half,
                         "reliability": 2 * r_half / (1 + r_half) if r_half is not None and r_half > -1 else None,
                         "improved_share": float(np.mean([q["ppl_ratio"] < 1 for q in scored])),
                         "kl": mean_or_none(q["kl"] for q in scored),
                         "prompt_kl": mean_or_none(k for k, _ in with_prompt),
                         # does the prompt positions' KL (no reference needed) rank prompts as the reference does?
                         "r_prompt_kl": _pearson(with_prompt)}
    rel = [v["reliability"] for v in per_action.values() if v["reliability"] is not None]
    return {"n_prompts": len(rows), "reference_tokens": mean_or_none(r["reference_tokens"] for r in rows),
            "per_action": per_action, "median_reliability": float(np.median(rel)) if rel else None}


def _pearson(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Pearson r of (x, y) pairs; None with fewer than 3 pairs or a constant side."""
    if len(pairs) < 3:
        return None
    x, y = np.asarray(pairs, dtype=float).T
    return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else None


# --------------------------------------------------------------------------- whole file

def summarize(metrics: Mapping, seed: int = 0) -> dict:
    """Summary block for whatever records metrics.json holds (train, test, evaluation, baselines)."""
    action_space = metrics.get("action_space") or None
    out = {}
    if metrics.get("episodes"):
        out["train"] = summarize_train(metrics["episodes"], action_space, seed=seed)
    if metrics.get("prompts"):
        out["test"] = summarize_test(metrics["prompts"], metrics.get("ablations"), action_space, seed=seed)
    if (metrics.get("evaluation") or {}).get("models"):
        out["evaluation"] = summarize_eval(metrics["evaluation"])
    if metrics.get("baselines"):
        out["baselines"] = summarize_baselines(metrics["baselines"])
    if metrics.get("offline_test"):
        from reporting.study.equal_speed import summarize_equal_speed   # it builds on this module
        out["offline_test"] = summarize_offline(metrics["offline_test"], seed=seed)
        out["equal_speed"] = summarize_equal_speed(metrics["offline_test"], seed=seed)
    offline = metrics.get("offline") or {}
    if offline.get("calibrations"):
        out["calibrations"] = summarize_calibrations(offline["calibrations"])
    if offline.get("outcomes"):
        from reporting.study.headroom import summarize_headroom
        out["quality"] = summarize_quality(offline["outcomes"])
        out["headroom"] = summarize_headroom(offline)
    return out
