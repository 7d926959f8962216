"""Plots of one run (the ``PLOTS`` registry) and the overlay plots of a cross-run comparison.

Every plot reads a metrics.json dict and its ``summaries.summarize`` summary, writes ``<out>.png`` and
``<out>.svg`` and returns their paths, or returns ``[]`` (logged) when the run lacks its data.
Colours are fixed per action target and intensity, so one action looks the same in every run.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot, no global backend or
rcParams change); the style is applied with ``matplotlib.rc_context``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.colors
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from common.markdown import is_number
from controller.arms import ARM_NAMES
from reporting import summaries
from reporting.summaries import ALL, DENSE, action_intensity, action_target

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- colours and style

STYLE = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 9.5,
    "ytick.labelsize": 9.5, "legend.fontsize": 8.5, "figure.titlesize": 13,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "savefig.dpi": 150, "svg.hashsalt": "adaptive-pruning", "svg.fonttype": "path",
}
TARGET_CMAPS = {"kv_cache": "Blues", "attention_heads": "Oranges", "ffn_neurons": "Greens",
                "transformer_layers": "Purples"}
DENSE_COLOUR = "#000000"
POLICY_COLOUR = "#d62728"
ORACLE_COLOUR = "#d4a017"
RANDOM_COLOUR = "#7f7f7f"
LOSS_COLOUR = "#1f77b4"      # offline comparison: the policy loses (CI below zero)


def action_colour(label: str) -> tuple[float, float, float, float]:
    """Fixed target -> colour family, intensity -> shade (darker = more pruned), same in every run."""
    target = action_target(label)
    if target == "none":
        return matplotlib.colors.to_rgba(DENSE_COLOUR)
    cmap = matplotlib.colormaps[TARGET_CMAPS.get(target, "YlOrBr")]
    return cmap(float(np.clip(0.35 + 1.1 * action_intensity(label), 0.35, 0.95)))


def model_colour(label: str) -> tuple[float, float, float, float]:
    """Evaluation model labels: dense, static:<action>, policy:<checkpoint>."""
    kind, _, rest = label.partition(":")
    if kind == "policy":
        return matplotlib.colors.to_rgba(POLICY_COLOUR)
    if kind == "static":
        return action_colour(rest)
    return action_colour(DENSE if kind in ("dense", DENSE) else label)


def _save(fig: Figure, out: Path) -> list[Path]:
    """PNG for screens, SVG for print; Date metadata dropped so re-renders are byte-identical."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png, svg = out.with_suffix(".png"), out.with_suffix(".svg")
    fig.savefig(png)
    fig.savefig(svg, metadata={"Date": None})
    return [png, svg]


def _rotate_xticks(ax) -> None:
    """Long action labels: slanted, anchored at their right end under the tick."""
    for label in ax.get_xticklabels():
        label.set(rotation=50, ha="right", rotation_mode="anchor")


def _skip(name: str, why: str) -> list[Path]:
    log.info("plot %s skipped: %s", name, why)
    return []


def _summary(metrics: Mapping, summary: Mapping | None) -> Mapping:
    return summary if summary is not None else summaries.summarize(metrics)


def _errbar(ci: Mapping) -> list[list[float]]:
    """Error-bar lengths below and above the mean of a bootstrap_ci dict."""
    mean, lo, hi = ci.get("mean"), ci.get("lo"), ci.get("hi")
    return [[mean - lo], [hi - mean]]


def _action_legend(fig: Figure, labels: Sequence[str], extra: Sequence[Line2D] = (), marker: str = "s") -> None:
    handles = list(extra) + [Line2D([], [], marker="s" if a == DENSE else marker, ls="", color=action_colour(a),
                                    markersize=8, label=a) for a in labels]
    fig.legend(handles=handles, loc="outside right upper", ncols=1 if len(handles) <= 16 else 2)


# --------------------------------------------------------------------------- plots


def _episode_columns(series: Mapping[str, list], key: str) -> tuple[tuple, tuple]:
    """(episodes, values) of one per-episode series, episodes without a value left out; both empty if none."""
    pts = [(e, v) for e, v in zip(series["episode"], series[key]) if v is not None]
    return tuple(zip(*pts)) if pts else ((), ())


def _figure_with_average(figsize: tuple[float, float], eps: Sequence, values: Sequence[float], *fmt: str,
                         **raw_style) -> tuple[Figure, Axes]:
    """A one-axes figure: the raw per-episode values, faint, under their moving average (call in STYLE)."""
    window = summaries.default_window(len(values))
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(eps, values, *fmt, color=RANDOM_COLOUR, alpha=0.5, **raw_style)
    ax.plot(eps, summaries.moving_average(values, window), color=POLICY_COLOUR, lw=2,
            label=f"moving average ({window} episodes)")
    return fig, ax


def plot_training_reward(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Reward per episode, its moving average, and epsilon on a twin axis."""
    series = summaries.per_episode_series(metrics.get("episodes") or [])
    eps, rewards = _episode_columns(series, "reward")
    if not eps:
        return _skip("training_reward", "no episode with an outcome")
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure_with_average((8, 4.5), eps, rewards, ".", label="reward per episode")
        ax.set(xlabel="episode", ylabel="reward (unitless)", title="Training reward")
        twin = ax.twinx()
        twin.plot(series["episode"], series["epsilon"], "--", color="#1f77b4", label="ε (exploration rate)")
        twin.set(ylabel="ε (probability of a random action)", ylim=(0, 1.05))
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="lower right")
        return _save(fig, out)


def plot_loss(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """TD loss per episode (log scale when positive) with a moving average."""
    eps, losses = _episode_columns(summaries.per_episode_series(metrics.get("episodes") or []), "loss")
    if not eps:
        return _skip("loss", "no loss recorded (replay buffer never reached a batch?)")
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure_with_average((8, 4), eps, losses, lw=1, label="loss per episode")
        if min(losses) > 0:
            ax.set_yscale("log")
        ax.set(xlabel="episode", ylabel="TD loss (Huber, reward units²)", title="Q-network loss")
        ax.legend()
        return _save(fig, out)


def plot_action_usage(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Stacked share of each action per window of decisions: how the choice settles during training."""
    episodes = metrics.get("episodes") or []
    if not episodes:
        return _skip("action_usage", "no episodes")
    usage = summaries.windowed_action_shares(episodes, metrics.get("action_space"))
    labels = list(usage["shares"])
    # Each window is a flat block from its first episode to the next window's first (contiguous steps).
    x = [v for s, e in zip(usage["start"], usage["start"][1:] + usage["end"][-1:]) for v in (s, e)]
    ys = [[v for v in usage["shares"][a] for _ in (0, 1)] for a in labels]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9, 4.5), layout="constrained")
        ax = fig.add_subplot()
        ax.stackplot(x, *ys, colors=[action_colour(a) for a in labels], labels=labels, lw=0)
        ax.set(xlabel="episode", ylabel="share of decisions", ylim=(0, 1), xlim=(min(x), max(x)),
               title=f"Action usage over training (windows of {usage['window']} decisions)")
        _action_legend(fig, labels)
        return _save(fig, out)


def plot_action_choice(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Policy's choice by prompt-complexity bucket and by load scenario (test; greedy choices if train)."""
    choice = _choice_tables(_summary(metrics, summary))
    if choice is None:
        return _skip("action_choice", "no test prompts or greedy training decisions")
    title, panels, order = choice
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(10, 4.5), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (xlabel, counts) in zip(axes, panels):
            _stacked_shares(ax, counts, order)
            ax.set(xlabel=xlabel, ylabel="share of prompts", ylim=(0, 1.08))
        fig.suptitle(title)
        _action_legend(fig, [a for a in order if any(a in c for c in (v for _, p in panels for v in p.values()))])
        return _save(fig, out)


def _choice_tables(summary: Mapping) -> tuple[str, list[tuple[str, dict]], list[str]] | None:
    test = summary.get("test")
    if test:
        groups = test["by_scenario"]
        overall = groups[ALL if ALL in groups else test["scenarios"][0]]
        panels = [("prompt complexity (tertiles)", overall["by_complexity"]),
                  ("load scenario", {s: groups[s]["policy_actions"] for s in test["scenarios"]})]
        return "Policy's action choice on held-out prompts", panels, test["actions"]
    train = summary.get("train")
    if train and train["greedy_by_scenario"]:
        panels = [("prompt complexity (tertiles)", train["greedy_by_complexity"]),
                  ("load scenario", train["greedy_by_scenario"])]
        return "Greedy (non-exploring) choices during training", panels, list(train["per_action"])
    return None


def _stacked_shares(ax, counts: Mapping[str, Mapping[str, int]], order: Sequence[str]) -> None:
    groups = list(counts)
    totals = [sum(counts[g].values()) or 1 for g in groups]
    bottom = np.zeros(len(groups))
    for a in order:
        share = np.array([counts[g].get(a, 0) / t for g, t in zip(groups, totals)])
        if share.any():
            ax.bar(groups, share, bottom=bottom, color=action_colour(a), width=0.7, edgecolor="white", lw=0.5)
            bottom += share
    for i, t in enumerate(totals):
        ax.text(i, 1.01, f"n={t}", ha="center", va="bottom", fontsize=9)


def plot_outcome_boxes(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Distribution over prompts of speedup and PPL ratio per action (test: every static action + policy)."""
    data = _outcome_samples(metrics)
    if not data:
        return _skip("outcome_boxes", "no outcomes")
    labels = list(data)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(8, 0.45 * len(labels) + 3), 7.5), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True)
        for ax, metric, ylabel in ((axes[0], "speedup", "speedup (× vs dense)"),
                                   (axes[1], "ppl_ratio", "PPL ratio (pruned / dense)")):
            values = [data[a][metric] or [np.nan] for a in labels]
            box = ax.boxplot(values, tick_labels=labels, patch_artist=True, widths=0.6, showfliers=True,
                             medianprops={"color": "white", "lw": 1.5})
            for patch, a in zip(box["boxes"], labels):
                patch.set_facecolor(POLICY_COLOUR if a == "policy" else action_colour(a))
            ax.axhline(1.0, color=DENSE_COLOUR, lw=0.8, ls=":")
            ax.set_ylabel(ylabel)
            finite = [v for vs in values for v in vs if np.isfinite(v) and v > 0]
            if metric == "ppl_ratio" and finite and max(finite) / min(finite) > 20:
                ax.set_yscale("log")
        _rotate_xticks(axes[1])
        fig.suptitle("Speed and quality per action (1.0 = dense)")
        return _save(fig, out)


def _outcome_samples(metrics: Mapping) -> dict[str, dict[str, list[float]]]:
    """{action: {"speedup": [...], "ppl_ratio": [...]}} in action-space order, finite values only."""
    outcomes: list[tuple[str, Mapping]] = []
    if metrics.get("prompts"):
        for p in metrics["prompts"]:
            outcomes += [("policy", p["policy"])] + list(p["static"].items())
    else:
        outcomes = [(e["outcome"]["action"], e["outcome"]) for e in metrics.get("episodes") or [] if e.get("outcome")]
    order = summaries.order_actions({a for a, _ in outcomes} - {"policy"}, metrics.get("action_space"))
    order = (["policy"] if metrics.get("prompts") else []) + order
    data = {a: {"speedup": [], "ppl_ratio": []} for a in order}
    for a, o in outcomes:
        for m in ("speedup", "ppl_ratio"):
            v = o.get(m)
            if isinstance(v, (int, float)) and np.isfinite(v):
                data[a][m].append(float(v))
    return data


def plot_pareto(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Speedup vs PPL ratio: every static action, dense, random, oracle and the policy, 95% CIs, static front."""
    test = _summary(metrics, summary).get("test")
    if not test:
        return _skip("pareto", "no test prompts")
    groups = test["scenarios"]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(6.2 * len(groups) + 2.5, 5.5), layout="constrained")
        axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
        for ax, group in zip(axes, groups):
            _pareto_panel(ax, test["by_scenario"][group], f"scenario {group}")
        axes[0].set_ylabel("PPL ratio (pruned / dense, log scale, lower is better)")
        axes[0].set_yscale("log")           # ratios span 1 to hundreds; shared y: all panels follow
        extra = [Line2D([], [], marker="*", ls="", color=POLICY_COLOUR, markersize=14, label="policy (95% CI)"),
                 Line2D([], [], marker="P", ls="", color=ORACLE_COLOUR, markersize=10, label="oracle"),
                 Line2D([], [], marker="D", ls="", color=RANDOM_COLOUR, markersize=8, label="random action"),
                 Line2D([], [], ls="--", color=DENSE_COLOUR, label="static Pareto front")]
        _action_legend(fig, [a for a in test["actions"] if any(a in test["by_scenario"][g]["static"] for g in groups)],
                       extra, marker="o")
        fig.suptitle("Speed vs quality: learned policy against static pruning")
        return _save(fig, out)


def _pareto_panel(ax, group: Mapping, title: str) -> None:
    static = group["static"]
    for a, s in static.items():
        if s["speedup"]["mean"] is None or s["ppl_ratio"]["mean"] is None:
            continue
        ax.errorbar(s["speedup"]["mean"], s["ppl_ratio"]["mean"], xerr=_errbar(s["speedup"]),
                    yerr=_errbar(s["ppl_ratio"]), fmt="s" if a == DENSE else "o", color=action_colour(a),
                    markersize=9 if a == DENSE else 7, elinewidth=0.8, capsize=2, zorder=3)
    front = group["pareto"]["front"]
    ax.plot([static[a]["speedup"]["mean"] for a in front], [static[a]["ppl_ratio"]["mean"] for a in front],
            "--", color=DENSE_COLOUR, lw=1, zorder=2)
    for arm, marker, colour, size in (("random", "D", RANDOM_COLOUR, 8), ("oracle", "P", ORACLE_COLOUR, 11),
                                      ("policy", "*", POLICY_COLOUR, 17)):
        point = group[arm]
        if point["speedup"]["mean"] is None or point["ppl_ratio"]["mean"] is None:
            continue
        ax.errorbar(point["speedup"]["mean"], point["ppl_ratio"]["mean"], xerr=_errbar(point["speedup"]),
                    yerr=_errbar(point["ppl_ratio"]), fmt=marker, color=colour, markersize=size,
                    markeredgecolor="black", markeredgewidth=0.6, elinewidth=1.2, capsize=3, zorder=5)
    ax.axvline(1.0, color=DENSE_COLOUR, lw=0.6, ls=":")
    ax.axhline(1.0, color=DENSE_COLOUR, lw=0.6, ls=":")
    ax.set(xlabel="speedup (× vs dense, higher is better)", title=f"{title} (n={group['n']})")


def plot_latency_breakdown(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Controller overhead next to prefill and decode time, seconds per prompt."""
    summary = _summary(metrics, summary)
    bars = _latency_bars(summary)
    if not bars:
        return _skip("latency_breakdown", "no timing recorded")
    parts = (("controller", "controller_s", POLICY_COLOUR), ("prefill", "prefill_s", "#1f77b4"),
             ("decode", "decode_s", "#9ecae1"), ("generation (not split)", "generation_s", RANDOM_COLOUR))
    names = list(bars)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(7, 0.5 * len(names) + 3), 5), layout="constrained")
        ax = fig.add_subplot()
        bottom = np.zeros(len(names))
        for label, key, colour in parts:
            values = np.array([bars[n].get(key) or 0.0 for n in names])
            if values.any():
                ax.bar(names, values, bottom=bottom, color=colour, label=label, width=0.7)
                bottom += values
        ax.set(ylabel="seconds per prompt (mean)", title="Where the time goes: controller vs model",
               xlabel="policy per scenario, then each static action over all prompts" if "test" in summary
               else "action chosen during training")
        _rotate_xticks(ax)
        ax.legend()
        return _save(fig, out)


def _latency_bars(summary: Mapping) -> dict[str, dict[str, float | None]]:
    """Bar name -> mean seconds per part; generation_s only where prefill/decode are not split."""
    bars: dict[str, dict] = {}
    test, train = summary.get("test"), summary.get("train")
    if test:
        for s in test["scenarios"]:
            bars[f"policy ({s})"] = dict(test["by_scenario"][s]["overhead"])
        overall = test["by_scenario"][test["groups"][-1]]
        for a, st in overall["static"].items():
            bars[a] = {"controller_s": 0.0, **st["timing"]}
    elif train:
        controller = train["overhead"]["controller_s"]
        for a, pa in train["per_action"].items():
            bars[a] = {"controller_s": controller, "prefill_s": pa["prefill_s"], "decode_s": pa["decode_s"],
                       "latency_s": pa["latency_s"]}
    for b in bars.values():
        split = b.get("prefill_s") is not None or b.get("decode_s") is not None
        b["generation_s"] = None if split else b.get("latency_s")
    return {k: v for k, v in bars.items() if any(v.get(p) for p in ("prefill_s", "decode_s", "generation_s"))}


def plot_evaluation(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """WikiText-2 PPL and zero-shot accuracy per task for each evaluated model."""
    ev = _summary(metrics, summary).get("evaluation")
    if not ev:
        return _skip("evaluation", "no evaluation results")
    models = list(ev["models"])
    colours = [model_colour(m) for m in models]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(10, 1.2 * len(ev["tasks"]) * max(1, len(models) / 3) + 5), 5),
                     layout="constrained")
        ax_ppl, ax_acc = fig.subplots(1, 2, width_ratios=[1, max(1, len(ev["tasks"]))])
        ppl = [ev["models"][m]["ppl"] for m in models]
        ax_ppl.bar(range(len(models)), [p or 0 for p in ppl], color=colours)
        for i, p in enumerate(ppl):
            if p is not None:
                ax_ppl.text(i, p, f"{p:.2f}", ha="center", va="bottom", fontsize=8)
        finite = [p for p in ppl if p]
        if finite and max(finite) / min(finite) > 10:
            ax_ppl.set_yscale("log")
        ax_ppl.set_xticks(range(len(models)), models)
        _rotate_xticks(ax_ppl)
        ax_ppl.set(ylabel="WikiText-2 perplexity (lower is better)", title="Perplexity")
        _accuracy_bars(ax_acc, ev, models, colours)
        fig.suptitle("Evaluation per model")
        return _save(fig, out)


def _accuracy_bars(ax, ev: Mapping, models: Sequence[str], colours: Sequence) -> None:
    tasks = ev["tasks"]
    if not tasks:
        ax.set_axis_off()
        return
    width = 0.8 / len(models)
    for i, (m, colour) in enumerate(zip(models, colours)):
        rows = [ev["models"][m]["tasks"].get(t, {}) for t in tasks]
        acc = [100 * (r.get("acc") or 0) for r in rows]
        err = [100 * (r.get("acc_stderr") or 0) for r in rows]
        ax.bar(np.arange(len(tasks)) + (i - (len(models) - 1) / 2) * width, acc, width, yerr=err,
               color=colour, label=m, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel="accuracy (%, ± stderr)", title="Zero-shot accuracy", ylim=(0, 100))
    ax.legend(ncols=min(3, len(models)))


def plot_baselines(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Static baselines: speedup vs WikiText-2 PPL, one line per method over budgets, front marked."""
    rows = metrics.get("baselines") or []
    front = set((_summary(metrics, summary).get("baselines") or {}).get("front", []))
    usable = [r for r in rows if is_number(r.get("speedup")) and is_number(r.get("ppl"))]
    if not usable:
        return _skip("baselines", "no baseline with speedup and PPL")
    methods = list(dict.fromkeys(r["method"] for r in usable))
    palette = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8, 5.5), layout="constrained")
        ax = fig.add_subplot()
        for i, method in enumerate(methods):
            mine = sorted((r for r in usable if r["method"] == method), key=lambda r: r["speedup"])
            ax.plot([r["speedup"] for r in mine], [r["ppl"] for r in mine], "o-", color=palette(i % 10),
                    label=method)
            on_front = [r for r in mine if summaries.baseline_label(r) in front]
            ax.plot([r["speedup"] for r in on_front], [r["ppl"] for r in on_front], "o", ms=12, mfc="none",
                    color=DENSE_COLOUR)
        ax.set(xlabel="speedup (× vs dense)", ylabel="WikiText-2 perplexity", title="Static baselines "
               "(circled: Pareto front)")
        ax.legend()
        return _save(fig, out)


def _offline_comparison_arms(o: Mapping) -> list[str]:
    """The arms policy − arm is plotted for: the fitted baselines, any ablation policies, random."""
    others = [a for a in o["arms"] if a not in (summaries.POLICY, *ARM_NAMES, *summaries.REFERENCE_ARMS)
              and a not in o["actions"]]
    return [*ARM_NAMES, *others, "random"]


def plot_offline_comparison(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Forest plot of the offline test: policy − each baseline (and ablation, and random) per load level and
    pooled, mean reward difference with its clustered 95% CI (seeds × prompts × calibrations).

    Right of zero the policy is better. Red: the CI excludes zero above (a win), blue: below (a loss),
    grey: it includes zero. The strongest baseline (the verdict's) is starred.
    """
    o = _summary(metrics, summary).get("offline_test")
    if not o:
        return _skip("offline_comparison", "no offline test")
    arms = _offline_comparison_arms(o)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8.5, 1.4 + 0.32 * (len(arms) + 1) * len(o["groups"])), layout="constrained")
        ax = fig.add_subplot()
        y, ticks = 0.0, []
        for g in o["groups"][::-1]:          # top to bottom: levels in order, pooled last
            for arm in arms[::-1]:
                ci = o["by_level"][g]["arms"][arm]["vs"]
                if ci["mean"] is not None:
                    sign = summaries.ci_sign(ci)
                    colour = {"better": POLICY_COLOUR, "worse": LOSS_COLOUR}.get(sign, RANDOM_COLOUR)
                    ax.errorbar([ci["mean"]], [y], xerr=np.array(_errbar(ci)).reshape(2, 1), fmt="o", color=colour,
                                capsize=3, ms=6)
                star = " ★" if arm == o["strongest_baseline"] else ""
                ticks.append((y, f"{'pooled' if g == ALL else g}: {arm}{star}"))
                y += 1
            ax.axhline(y - 0.3, color=DENSE_COLOUR, lw=0.4, alpha=0.4)
            y += 0.4
        ax.axvline(0.0, color=DENSE_COLOUR, lw=0.8)
        ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks])
        ax.set_ylim(-0.7, y - 0.6)
        ax.set(xlabel="policy − arm, mean reward (95% CI clustered: seeds × prompts × calibrations)",
               title=f"Offline test ({o['n_seeds']} seeds): policy − each arm\n"
                     "red: policy better, grey: CI includes 0, blue: worse; ★ strongest baseline")
        return _save(fig, out)


def plot_load_features(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Per load level: the dense model's measured slowdown (each calibration, against the level's minimum),
    then each load telemetry feature (mean ± sd of the readings taken during its calibrations).

    A feature tells the levels apart when its bars differ by more than their error bars; each panel's
    title gives its largest distance from idle in sds (d, as in the report's table). A feature that is
    the same at every level (CPU utilisation on a shared machine) cannot help the policy.
    """
    cals = _summary(metrics, summary).get("calibrations")
    if not cals:
        return _skip("load_features", "no offline calibrations")
    levels = list(cals)
    recorded = [n for n in summaries.load_feature_names() if all(n in cals[lv]["features"] for lv in levels)]
    # 0 with no spread at every level: never read on this machine (an unavailable reading is 0), no panel
    silent = [n for n in recorded if all(cals[lv]["features"][n]["mean"] == 0 == cals[lv]["features"][n]["sd"]
                                         for lv in levels)]
    names = [n for n in recorded if n not in silent]
    minimum = {lv: v.get("min_slowdown") for lv, v in ((metrics.get("load_verification") or {}).get("levels")
                                                       or {}).items()}
    colours = [RANDOM_COLOUR if lv == "idle" else POLICY_COLOUR for lv in levels]
    ncols = min(4, len(names) + 1)
    nrows = -(-(len(names) + 1) // ncols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(3.1 * ncols, 2.9 * nrows + 0.5), layout="constrained")
        ax = fig.add_subplot(nrows, ncols, 1)
        x = np.arange(len(levels))
        ax.bar(x, [float(np.median(cals[lv]["slowdown"])) for lv in levels], color=colours, alpha=0.6)
        for i, lv in enumerate(levels):
            ax.plot([i] * len(cals[lv]["slowdown"]), cals[lv]["slowdown"], "k.", ms=5)
            if is_number(minimum.get(lv)) and minimum[lv] > 1.0:
                ax.plot([i - 0.4, i + 0.4], [minimum[lv]] * 2, color=LOSS_COLOUR, lw=2)
        ax.axhline(1.0, color=DENSE_COLOUR, lw=0.6, ls=":")
        ax.set_xticks(x, levels)
        ax.set_title("dense slowdown × (measured;\nblue bar: required minimum)", fontsize=9)
        _rotate_xticks(ax)
        for i, name in enumerate(names):
            ax = fig.add_subplot(nrows, ncols, i + 2)
            feats = [cals[lv]["features"][name] for lv in levels]
            ax.bar(x, [f["mean"] for f in feats], yerr=[f["sd"] for f in feats], color=colours, capsize=3)
            seps = [cals[lv]["separation"][name] for lv in levels if name in cals[lv].get("separation", {})]
            ax.set_xticks(x, levels)
            ax.set_title(name + (f" (max d {max(seps):.1f})" if seps else ""), fontsize=9)
            _rotate_xticks(ax)
        fig.suptitle("Load levels: measured slowdown and telemetry (mean ± sd during calibration)"
                     + (f"\nzero at every level, not shown: {', '.join(silent)}" if silent else ""))
        return _save(fig, out)


PlotFn = Callable[[Mapping, Path, "Mapping | None"], list[Path]]

PLOTS: tuple[tuple[str, str, PlotFn], ...] = (
    ("training_reward", "Training reward and exploration rate", plot_training_reward),
    ("loss", "Q-network loss", plot_loss),
    ("action_usage", "Action usage over training", plot_action_usage),
    ("action_choice", "Action choice by prompt complexity and load scenario", plot_action_choice),
    ("outcome_boxes", "Speedup and PPL ratio per action", plot_outcome_boxes),
    ("pareto", "Pareto plot: speedup vs PPL ratio", plot_pareto),
    ("latency_breakdown", "Latency breakdown: controller vs prefill vs decode", plot_latency_breakdown),
    ("evaluation", "Evaluation: perplexity and accuracy per model", plot_evaluation),
    ("baselines", "Static baselines: speedup vs perplexity", plot_baselines),
    ("offline_comparison", "Offline test: policy − each baseline per load level", plot_offline_comparison),
    ("load_features", "Telemetry features per load level", plot_load_features),
)


def render_plots(metrics: Mapping, plots_dir: Path, summary: Mapping | None = None) -> dict[str, list[Path]]:
    """Every plot whose data the run has; name -> files written."""
    summary = _summary(metrics, summary)
    written = {}
    for name, _, fn in PLOTS:
        paths = fn(metrics, plots_dir / name, summary)
        if paths:
            written[name] = paths
    return written


# --------------------------------------------------------------------------- comparison across runs


def overlay_reward(runs: Sequence[tuple[str, Mapping]], plots_dir: Path) -> list[Path]:
    """Moving-average training reward of every (run name, metrics) pair that has one, on one axis."""
    curves = []
    for name, m in runs:
        eps, rewards = _episode_columns(summaries.per_episode_series(m.get("episodes") or []), "reward")
        if eps:
            curves.append((name, eps, rewards))
    if not curves:
        return []
    palette = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for i, (name, eps, rewards) in enumerate(curves):
            ax.plot(eps, summaries.moving_average(rewards, summaries.default_window(len(rewards))),
                    color=palette(i % 10), lw=2, label=name)
        ax.set(xlabel="episode", ylabel="reward, moving average (unitless)", title="Training reward by run")
        fig.legend(loc="outside right upper")
        return _save(fig, plots_dir / "comparison_reward")


def overlay_pareto(runs: Sequence[tuple[str, Mapping]], sums: Mapping[str, Mapping], plots_dir: Path) -> list[Path]:
    """The policy's speedup vs PPL ratio (95% CI) per run and scenario, from each run's summary."""
    tests = [(name, sums[name]["test"]) for name, _ in runs if sums[name].get("test")]
    if not tests:
        return []
    palette = matplotlib.colormaps["tab10"]
    markers = "o^sDvP*X"
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9, 5.5), layout="constrained")
        ax = fig.add_subplot()
        for i, (name, t) in enumerate(tests):
            for j, g in enumerate(t["scenarios"]):
                p = t["by_scenario"][g]["policy"]
                if p["speedup"]["mean"] is None or p["ppl_ratio"]["mean"] is None:
                    continue
                ax.errorbar(p["speedup"]["mean"], p["ppl_ratio"]["mean"], xerr=_errbar(p["speedup"]),
                            yerr=_errbar(p["ppl_ratio"]), fmt=markers[j % len(markers)], color=palette(i % 10),
                            markersize=9, capsize=3, label=f"{name} [{g}]")
        ax.axvline(1.0, color=DENSE_COLOUR, lw=0.6, ls=":")
        ax.axhline(1.0, color=DENSE_COLOUR, lw=0.6, ls=":")
        ax.set(xlabel="speedup (× vs dense)", ylabel="PPL ratio (pruned / dense)",
               title="Policy per run and scenario (95% CI)")
        fig.legend(loc="outside right upper")
        return _save(fig, plots_dir / "comparison_pareto")
