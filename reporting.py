"""Report folders: metrics.json written atomically during a run, then plots and report.md from it.

A run folder explains itself: ``reports/<kind>-<YYYYmmdd-HHMMSS>-<model>/`` holds metrics.json
(raw records + provenance + a summary computed by ``summaries``), config.json, ``plots/*.png|svg``
and report.md. ``render`` rebuilds plots and report.md from metrics.json alone, so a crashed run
(partial metrics.json) or an old run can always be re-reported. report.md, the console summary
and the stored summary are all built from the same ``summaries.summarize`` dict.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot, no global backend or
rcParams change); the style is applied with ``matplotlib.rc_context``.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, is_dataclass
from datetime import datetime
from pathlib import Path

import matplotlib
import matplotlib.colors
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

import provenance
import summaries
from records import RUN_KINDS, SCHEMA_VERSION, EpisodeRecord, PromptResult, to_jsonable
from summaries import ALL, DENSE, action_intensity, action_target

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
MAX_PROBLEMS = 25
TASK_NUMBERS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")
SPEED_NUMBERS = ("prefill_tok_s", "decode_tok_s", "latency_s", "peak_rss_mb", "energy_j", "controller_s")

# --------------------------------------------------------------------------- run folders


@dataclass(frozen=True)
class RunDir:
    """One run's report folder; the trainer, tester and evaluator write through it."""
    path: Path
    kind: str

    @classmethod
    def create(cls, base: Path, kind: str, model_name: str, now: datetime | None = None) -> "RunDir":
        """Make ``base/<kind>-<YYYYmmdd-HHMMSS>-<model-slug>[-N]``; mkdir claims the name atomically."""
        if kind not in RUN_KINDS:
            raise ValueError(f"unknown run kind '{kind}': choose from {', '.join(RUN_KINDS)}")
        base = Path(base)
        base.mkdir(parents=True, exist_ok=True)
        stem = f"{kind}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}-{model_slug(model_name)}"
        for n in range(1, 10_000):
            path = base / (stem if n == 1 else f"{stem}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path, kind)
        raise RuntimeError(f"could not find a free run folder name under {base} for {stem}")

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def write_metrics(self, metrics: Mapping) -> Path:
        """Write metrics.json atomically, with the summary recomputed and the wall time stamped.

        Call it as often as progress allows, with ``partial=True`` until the run ends, so a crash
        leaves a valid file that ``render`` reports as partial.
        """
        data = {"schema_version": SCHEMA_VERSION, "kind": self.kind, "partial": False,
                "partial_reason": None, **metrics}
        if data["kind"] != self.kind:
            raise ValueError(f"metrics of kind '{data['kind']}' written into a {self.kind} run folder {self.path}")
        if isinstance(data.get("provenance"), Mapping):
            data["provenance"] = provenance.stamp_wall_time(dict(data["provenance"]))
        data["summary"] = summaries.summarize(data)
        for problem in validate_metrics(data):
            log.warning("metrics.json of %s: %s", self.path.name, problem)
        _atomic_write_text(self.metrics_path, json.dumps(data, indent=1, default=_json_default))
        return self.metrics_path

    def write_config(self, config: Mapping) -> Path:
        path = self.path / CONFIG_FILE
        _atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True, default=str))
        return path


def _json_default(obj: object) -> object:
    """Numpy scalars and arrays, paths and dataclasses that reached the metrics dict unconverted."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; convert it before writing metrics")


def model_slug(model_name: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct' -> 'SmolLM2-135M-Instruct' (safe as a folder name)."""
    last = str(model_name).rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "model"


def _atomic_write_text(path: Path, text: str) -> None:
    """Temp file in the same folder + fsync + os.replace: readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; reports are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a run folder holds the metrics.json its run wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it cannot be reported") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a metrics object")
    return data


# --------------------------------------------------------------------------- schema validation


def validate_metrics(d: object) -> list[str]:
    """Problems with a metrics.json object (empty when valid); record fields are checked against records.py."""
    if not isinstance(d, Mapping):
        return [f"metrics must be an object, got {type(d).__name__}"]
    problems: list[str] = []
    version = d.get("schema_version")
    if version is None:
        problems.append("schema_version: missing")
    elif version != SCHEMA_VERSION:
        problems.append(f"schema_version: {version!r} is not supported (this code reads {SCHEMA_VERSION})")
    kind = d.get("kind")
    if kind not in RUN_KINDS:
        problems.append(f"kind: {kind!r} is not one of {', '.join(RUN_KINDS)}")
    _expect(d, "partial", bool, problems, required=True)
    if d.get("partial_reason") is not None:
        _expect(d, "partial_reason", str, problems)
    for key in ("provenance", "config", "summary"):
        _expect(d, key, Mapping, problems, required=key != "summary")
    _check_value(d.get("action_space", []), list[str], "action_space", problems)
    required = {"train": "episodes", "test": "prompts", "eval": "evaluation", "baselines": "baselines"}.get(kind)
    if required and required not in d:
        problems.append(f"{required}: missing (a {kind} run records it, empty while nothing is done yet)")
    _check_value(d.get("episodes", []), list[EpisodeRecord], "episodes", problems)
    _check_value(d.get("prompts", []), list[PromptResult], "prompts", problems)
    _check_ablations(d.get("ablations", {}), problems)
    _check_evaluation(d.get("evaluation", {"models": {}}), problems)
    _check_baselines(d.get("baselines", []), problems)
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
    return problems


def _expect(d: Mapping, key: str, typ: type, problems: list[str], required: bool = False) -> None:
    if key not in d:
        if required:
            problems.append(f"{key}: missing")
    elif not isinstance(d[key], typ) or (typ is not bool and isinstance(d[key], bool)):
        problems.append(f"{key}: expected {typ.__name__}, got {type(d[key]).__name__}")


def _check_value(value: object, hint: object, path: str, problems: list[str]) -> None:
    """Check a JSON value against a records.py type hint (scalars, X | None, list[X], dict[str, X], records)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        trial: list[str] = []
        for option in options:
            trial = []
            _check_value(value, option, path, trial)
            if not trial:
                return
        problems.extend(trial if len(options) == 1 else [f"{path}: {_type_name(value)} matches none of {hint}"])
    elif is_dataclass(hint):
        _check_record(value, hint, path, problems)
    elif origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_type_name(value)}")
            return
        for i, item in enumerate(value):
            _check_value(item, args[0], f"{path}[{i}]", problems)
    elif origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {_type_name(value)}")
            return
        for key, item in value.items():
            _check_value(item, args[1], f"{path}.{key}", problems)
    elif not _is_instance(value, hint):
        problems.append(f"{path}: expected {getattr(hint, '__name__', hint)}, got {_type_name(value)}")


def _is_instance(value: object, hint: object) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_record(value: object, cls: type, path: str, problems: list[str]) -> None:
    if not isinstance(value, Mapping):
        problems.append(f"{path}: expected a {cls.__name__} object, got {_type_name(value)}")
        return
    hints = _record_hints(cls)
    for f in fields(cls):
        if f.name in value:
            _check_value(value[f.name], hints[f.name], f"{path}.{f.name}", problems)
        elif f.default is MISSING and f.default_factory is MISSING:
            problems.append(f"{path}.{f.name}: missing")


@functools.lru_cache(maxsize=None)
def _record_hints(cls: type) -> dict[str, object]:
    """Resolved field types of a record class (memoised: thousands of records share a few classes)."""
    return typing.get_type_hints(cls)


def _check_ablations(ablations: object, problems: list[str]) -> None:
    if not isinstance(ablations, Mapping):
        problems.append(f"ablations: expected an object, got {_type_name(ablations)}")
        return
    for name, value in ablations.items():
        if not isinstance(value, Mapping):
            _check_value(value, list[PromptResult], f"ablations.{name}", problems)


def _check_evaluation(evaluation: object, problems: list[str]) -> None:
    models = evaluation.get("models") if isinstance(evaluation, Mapping) else None
    if not isinstance(models, Mapping):
        problems.append("evaluation.models: expected an object of model label -> results")
        return
    for label, m in models.items():
        path = f"evaluation.models.{label}"
        if not isinstance(m, Mapping):
            problems.append(f"{path}: expected an object, got {_type_name(m)}")
            continue
        _check_numbers(m.get("wikitext") or {}, ("ppl", "tokens"), f"{path}.wikitext", problems)
        tasks = m.get("tasks", {})
        if not isinstance(tasks, Mapping):
            problems.append(f"{path}.tasks: expected an object, got {_type_name(tasks)}")
            tasks = {}
        for task, row in tasks.items():
            _check_numbers(row, TASK_NUMBERS, f"{path}.tasks.{task}", problems)
        _check_numbers(m.get("speed", {}), SPEED_NUMBERS, f"{path}.speed", problems)
        _check_value(m.get("actions", {}), dict[str, int], f"{path}.actions", problems)


def _check_numbers(row: object, keys: Sequence[str], path: str, problems: list[str]) -> None:
    """The named fields, where present, are numbers or null; other fields are the producer's business."""
    if not isinstance(row, Mapping):
        problems.append(f"{path}: expected an object, got {_type_name(row)}")
        return
    for key in keys:
        if key in row:
            _check_value(row[key], float | None, f"{path}.{key}", problems)


def _check_baselines(rows: object, problems: list[str]) -> None:
    if not isinstance(rows, list):
        problems.append(f"baselines: expected a list, got {_type_name(rows)}")
        return
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or not isinstance(row.get("method"), str):
            problems.append(f"baselines[{i}]: expected an object with a 'method' name")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- number formatting
# One formatter for report.md and the console, so the two always print the same strings.


def fmt(x: object, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{nd}f}" if np.isfinite(x) else str(x)
    return str(x)


def _ci_parts(ci: Mapping | None) -> tuple[float | None, float | None, float | None]:
    return (ci.get("mean"), ci.get("lo"), ci.get("hi")) if ci else (None, None, None)


def fmt_ci(ci: Mapping | None, nd: int = 3) -> str:
    """'0.123 [0.100, 0.150]' from a bootstrap_ci dict."""
    mean, lo, hi = _ci_parts(ci)
    if mean is None:
        return "–"
    return f"{fmt(mean, nd)} [{fmt(lo, nd)}, {fmt(hi, nd)}]"


def fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _code(label: str) -> str:
    return f"`{label}`"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


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
    mean, lo, hi = _ci_parts(ci)
    return [[mean - lo], [hi - mean]]


def _action_legend(fig: Figure, labels: Sequence[str], extra: Sequence[Line2D] = (), marker: str = "s") -> None:
    handles = list(extra) + [Line2D([], [], marker="s" if a == DENSE else marker, ls="", color=action_colour(a),
                                    markersize=8, label=a) for a in labels]
    fig.legend(handles=handles, loc="outside right upper", ncols=1 if len(handles) <= 16 else 2)


# --------------------------------------------------------------------------- plots


def plot_training_reward(metrics: Mapping, out: Path, summary: Mapping | None = None) -> list[Path]:
    """Reward per episode, its moving average, and epsilon on a twin axis."""
    series = summaries.per_episode_series(metrics.get("episodes") or [])
    pts = [(e, r) for e, r in zip(series["episode"], series["reward"]) if r is not None]
    if not pts:
        return _skip("training_reward", "no episode with an outcome")
    eps, rewards = zip(*pts)
    window = summaries.default_window(len(rewards))
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(eps, rewards, ".", color=RANDOM_COLOUR, alpha=0.5, label="reward per episode")
        ax.plot(eps, summaries.moving_average(rewards, window), color=POLICY_COLOUR, lw=2,
                label=f"moving average ({window} episodes)")
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
    series = summaries.per_episode_series(metrics.get("episodes") or [])
    pts = [(e, v) for e, v in zip(series["episode"], series["loss"]) if v is not None]
    if not pts:
        return _skip("loss", "no loss recorded (replay buffer never reached a batch?)")
    eps, losses = zip(*pts)
    window = summaries.default_window(len(losses))
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(eps, losses, color=RANDOM_COLOUR, alpha=0.5, lw=1, label="loss per episode")
        ax.plot(eps, summaries.moving_average(losses, window), color=POLICY_COLOUR, lw=2,
                label=f"moving average ({window} episodes)")
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
        axes[0].set_ylabel("PPL ratio (pruned / dense, lower is better)")
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
    usable = [r for r in rows if _number(r.get("speedup")) and _number(r.get("ppl"))]
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


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


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


# --------------------------------------------------------------------------- report.md


def render(run_dir: Path) -> Path:
    """Regenerate every plot and report.md of a run folder from its metrics.json alone."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    problems = validate_metrics(metrics)
    for problem in problems:
        log.warning("%s: %s", run_dir / METRICS_FILE, problem)
    try:
        summary = summaries.summarize(metrics)
        plots = render_plots(metrics, run_dir / PLOTS_DIR, summary)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if not problems:   # valid records that cannot be summarised are a bug here: surface it
            raise
        log.error("%s: records could not be summarised: %s", run_dir, err)
        summary, plots = {}, {}
        problems = [*problems, f"no tables or plots: the records could not be summarised "
                               f"({type(err).__name__}: {err})"]
    text = report_markdown(metrics, summary, run_dir.name, plots, run_dir, problems)
    path = run_dir / REPORT_FILE
    _atomic_write_text(path, text)
    log.info("report written: %s", path)
    return path


def report_markdown(metrics: Mapping, summary: Mapping, run_name: str, plots: Mapping[str, list[Path]],
                    run_dir: Path, problems: Sequence[str] = ()) -> str:
    lines = [f"# {str(metrics.get('kind', 'run')).capitalize()} report: {run_name}", ""]
    lines += _partial_note(metrics, summary)
    if problems:
        lines += ["> **metrics.json problems** (the figures below may be incomplete):", ">"]
        lines += [f"> - {_cell(p)}" for p in problems] + [""]
    lines += _provenance_section(metrics.get("provenance") or {}, metrics)
    if "train" in summary:
        lines += _train_section(summary["train"])
    if "test" in summary:
        lines += _test_section(summary["test"])
    if "evaluation" in summary:
        lines += _evaluation_section(summary["evaluation"])
    if metrics.get("baselines"):
        lines += _baselines_section(metrics["baselines"], summary.get("baselines") or {})
    lines += _plots_section(plots, run_dir)
    lines += _config_section(metrics.get("config"))
    return "\n".join(lines).rstrip() + "\n"


def _partial_note(metrics: Mapping, summary: Mapping) -> list[str]:
    if not metrics.get("partial"):
        return []
    done = []
    if "train" in summary:
        done.append(f"{summary['train']['n_episodes']} episodes")
    if "test" in summary:
        done.append(f"{summary['test']['n_prompts']} prompts")
    reason = metrics.get("partial_reason") or "no reason recorded"
    recorded = ", ".join(done) or "the records"
    return [f"> **Partial run.** This run did not finish ({_cell(reason)}). The figures below cover only "
            f"{recorded} recorded before it stopped.", ""]


def _provenance_section(prov: Mapping, metrics: Mapping) -> list[str]:
    git = prov.get("git") or {}
    model = prov.get("model") or {}
    hw = prov.get("hardware") or {}
    commit = git.get("commit")
    commit_text = "–" if not commit else f"`{commit}`" + (" (dirty)" if git.get("dirty") else "")
    params = model.get("parameters")
    model_text = "–" if not model else (f"`{model.get('id')}` ({model.get('source') or 'unknown source'}"
                                        + (f", {params / 1e6:.1f} M parameters)" if params else ")"))
    cores = f"{hw.get('physical_cores')} physical / {hw.get('logical_cores')} logical cores"
    if hw.get("usable_cores") is not None:
        cores += f" ({hw['usable_cores']} usable)"
    hardware = "–" if not hw else (f"{hw.get('cpu_model') or 'unknown CPU'}, {cores}, {hw.get('ram_gb')} GB RAM, "
                                   f"GPU: {', '.join(hw.get('gpus') or []) or 'none'}")
    libs = ", ".join(f"{k} {v}" for k, v in sorted((prov.get("libraries") or {}).items()) if v)
    rows = [
        ("started (UTC)", prov.get("started_at")),
        ("wall time", f"{fmt(prov.get('wall_s'), 1)} s" if prov.get("wall_s") is not None else None),
        ("command", f"`{prov['command']}`" if prov.get("command") else None),
        ("git commit", commit_text),
        ("model", model_text),
        ("device", prov.get("device")),
        ("hardware", hardware),
        ("seed", prov.get("seed")),
        ("scenario", prov.get("scenario")),
        ("NLP backend", prov.get("nlp_backend")),
        ("action space", f"{len(metrics.get('action_space') or [])} actions"),
        ("Python", f"{prov.get('python')} on {prov.get('platform')}" if prov.get("python") else None),
        ("libraries", libs),
        ("schema version", metrics.get("schema_version")),
    ]
    return ["## Provenance", ""] + _table(["", ""], [(k, fmt(v)) for k, v in rows])


def _train_section(t: Mapping) -> list[str]:
    lines = ["## Training", ""]
    lines += [f"- episodes: {t['n_episodes']} ({t['n_decisions']} decisions), failed: {t['n_failed']}, "
              f"explored: {t['n_explored']}",
              f"- mean reward: {fmt_ci(t['reward'])} (95% bootstrap CI over decisions)",
              f"- mean reward, first {t['window']} decisions: {fmt(t['reward_first'])}; "
              f"last {t['window']}: {fmt(t['reward_last'])}",
              f"- final ε: {fmt(t['final_epsilon'])}; mean of the last {t['window']} recorded losses: "
              f"{fmt(t['loss_last'], 4)}", ""]
    lines += ["### Per-action outcomes (all decisions, exploration included)", ""]
    lines += _table(["action", "count", "share", "explored", "mean reward", "mean speedup (×)",
                     "mean PPL ratio", "mean KL (nats/token)"],
                    [(_code(a), p["count"], fmt_pct(p["share"]), p["explored"], fmt(p["mean_reward"]),
                      fmt(p["mean_speedup"]), fmt(p["mean_ppl_ratio"]), fmt(p["mean_kl"], 4))
                     for a, p in t["per_action"].items()])
    lines += _choice_table("### Greedy choices by load scenario", t["greedy_by_scenario"], list(t["per_action"]))
    lines += _choice_table(f"### Greedy choices by prompt complexity (tertile edges {_edges(t['complexity_edges'])})",
                           t["greedy_by_complexity"], list(t["per_action"]))
    lines += ["### Controller overhead vs generation (mean seconds per decision)", ""]
    lines += _overhead_table([("all decisions", t["overhead"])])
    return lines


def _edges(edges: Sequence[float]) -> str:
    return ", ".join(fmt(e) for e in edges) or "–"


def _choice_table(title: str, counts: Mapping[str, Mapping[str, int]], order: Sequence[str],
                  extra_rows: Sequence[Sequence[object]] = ()) -> list[str]:
    """Counts of each action (rows) per scenario or bucket (columns), with a total row."""
    if not counts:
        return [title, "", "No decisions in this view.", ""]
    cols = list(counts)
    used = [a for a in order if any(a in counts[c] for c in cols)]
    rows = [(_code(a), *(counts[c].get(a, 0) for c in cols)) for a in used]
    rows.append(("**total**", *(sum(counts[c].values()) for c in cols)))
    return [title, ""] + _table(["action", *cols], [*rows, *extra_rows])


def _overhead_table(rows: Sequence[tuple[str, Mapping]]) -> list[str]:
    return _table(["", "controller (s)", "prefill (s)", "decode (s)", "generation (s)", "controller share"],
                  [(name, fmt(o["controller_s"], 4), fmt(o["prefill_s"], 4), fmt(o["decode_s"], 4),
                    fmt(o["latency_s"], 4), fmt_pct(o["controller_share"])) for name, o in rows])


def _test_section(t: Mapping) -> list[str]:
    lines = ["## Test: policy vs static actions, dense, random and oracle", "",
             f"{t['n_prompts']} held-out prompts; scenarios: {', '.join(t['scenarios'])}. Intervals are 95% "
             "percentile-bootstrap CIs over prompts (2000 resamples, seed 0); differences are paired by prompt.", ""]
    for g in t["groups"]:
        lines += _test_group_section(g, t["by_scenario"][g])
    groups = t["by_scenario"]
    intensity = ("mean intensity [95% CI]", *(fmt_ci(groups[s]["aggressiveness"]) for s in t["scenarios"]))
    lines += _choice_table("### Policy's action choice by load scenario",
                           {s: groups[s]["policy_actions"] for s in t["scenarios"]}, t["actions"], [intensity])
    by_cx = {f"{s} / {b}": c for s in t["scenarios"] for b, c in groups[s]["by_complexity"].items()}
    lines += _choice_table(f"### Policy's action choice by scenario / prompt complexity (tertile edges "
                           f"{_edges(t['complexity_edges'])})", by_cx, t["actions"])
    lines += ["### Controller overhead vs generation (policy, mean seconds per prompt)", ""]
    lines += _overhead_table([(g, groups[g]["overhead"]) for g in t["groups"]])
    if t["ablations"]:
        lines += _ablation_section(t["ablations"])
    return lines


def _test_group_section(name: str, g: Mapping) -> list[str]:
    title = "all scenarios" if name == ALL else f"scenario `{name}`"
    header = ["arm", "mean reward [95% CI]", "speedup (×) [95% CI]", "PPL ratio [95% CI]", "KL [95% CI]"]

    def row(label: str, arm: Mapping) -> tuple:
        return (label, fmt_ci(arm["reward"]), fmt_ci(arm["speedup"]), fmt_ci(arm["ppl_ratio"]), fmt_ci(arm["kl"], 4))

    rows = [row("**policy**", g["policy"])]
    for a, s in g["static"].items():
        tags = [t for t, on in (("dense", a == DENSE), ("best static", a == g["best_static"])) if on]
        rows.append(row(_code(a) + (f" ({', '.join(tags)})" if tags else ""), s))
    rows += [row("random action (expected)", g["random"]), row("oracle (best action per prompt)", g["oracle"])]
    best = g["best_static"]
    diffs = [("regret = oracle − policy", g["regret"]),
             (f"policy − best static ({_code(best) if best else '–'})", g["vs_best_static"]),
             ("policy − random", g["vs_random"]), ("policy − dense", g["vs_dense"])]
    lines = [f"### Policy vs baselines, {title} (n = {g['n']} prompts)", ""] + _table(header, rows)
    lines += _left_out_note(g)
    lines += ["Paired reward differences:", ""] + _table(["comparison", "mean [95% CI]", "CI excludes 0"],
                                                          [(k, fmt_ci(v), _excludes_zero(v)) for k, v in diffs])
    lines += [_pareto_sentence(g), "",
              f"Policy agrees with the oracle on {fmt_pct(g['oracle_agreement'])} of prompts; mean intensity of its "
              f"actions: {fmt_ci(g['aggressiveness'])}.", ""]
    return lines


def _left_out_note(g: Mapping) -> list[str]:
    """Name every mean that stands on fewer prompts than the group (missing or non-finite values)."""
    arms = [("policy", g["policy"]), *((f"`{a}`", s) for a, s in g["static"].items()), ("oracle", g["oracle"])]
    short = [f"{arm} {m} ({g['n'] - cis[m]['n']} of {g['n']})" for arm, cis in arms
             for m in summaries.METRICS if m in cis and cis[m]["n"] < g["n"]]
    return [f"Left out as missing or non-finite: {', '.join(short)}.", ""] if short else []


def _excludes_zero(ci: Mapping) -> str:
    mean, lo, hi = _ci_parts(ci)
    if mean is None:
        return "–"
    return "yes (> 0)" if lo > 0 else "yes (< 0)" if hi < 0 else "no"


def _pareto_sentence(g: Mapping) -> str:
    p = g["pareto"]
    front = ", ".join(_code(a) for a in p["front"]) or "–"
    where = ("unknown (policy has no speedup or PPL ratio)" if p["policy_on_front"] is None
             else "on or beyond the static front (no static action dominates it)" if p["policy_on_front"]
             else "dominated by " + ", ".join(_code(a) for a in p["policy_dominated_by"]))
    return (f"Static Pareto front (speedup ↑, PPL ratio ↓, by mean): {front}. The policy point "
            f"({fmt(g['policy']['speedup']['mean'])}×, PPL ratio {fmt(g['policy']['ppl_ratio']['mean'])}) is {where}.")


def _ablation_section(ablations: Mapping) -> list[str]:
    rows, reported = [], []
    for name, groups in ablations.items():
        if "reported" in groups:
            reported.append((name, groups["reported"]))
            continue
        for g, s in groups.items():
            rows.append((name, g, s["n"], fmt_ci(s["policy"]["reward"]), fmt_ci(s["policy"]["speedup"]),
                         fmt_ci(s["policy"]["ppl_ratio"]), fmt_ci(s["vs_policy"]), fmt_ci(s["aggressiveness"])))
    lines = ["### Ablations (same prompts)", ""]
    if rows:
        lines += _table(["ablation", "scenario", "n", "mean reward [95% CI]", "speedup (×)", "PPL ratio",
                         "ablation − policy reward [95% CI]", "mean intensity [95% CI]"], rows)
    for name, value in reported:
        lines += [f"`{name}` (summary as reported by the run):", "", "```json",
                  json.dumps(value, indent=2, sort_keys=True), "```", ""]
    return lines


def _evaluation_section(ev: Mapping) -> list[str]:
    tasks = ev["tasks"]
    header = ["model", "WikiText-2 PPL", "PPL ratio", "tokens", *(f"{t} acc % (norm)" for t in tasks), "mean acc %"]
    rows = [(_code(m), fmt(s["ppl"], 2), fmt(s["ppl_ratio"]), fmt(s["tokens"]),
             *(_task_cell(s["tasks"].get(t) or {}) for t in tasks), _pct_or_dash(s["mean_acc"]))
            for m, s in ev["models"].items()]
    lines = ["## Evaluation", ""] + _table(header, rows)
    protocols = {json.dumps(s["protocol"], sort_keys=True) for s in ev["models"].values() if s["protocol"]}
    for p in sorted(protocols):
        lines += ["WikiText-2 protocol: " + ", ".join(f"{k}={v}" for k, v in json.loads(p).items()), ""]
    speed_keys = (("prefill_tok_s", "prefill tok/s", 1), ("decode_tok_s", "decode tok/s", 1),
                  ("latency_s", "latency (s)", 4), ("peak_rss_mb", "peak RSS (MB)", 0),
                  ("energy_j", "energy (J)", 2), ("controller_s", "controller (s)", 4))
    lines += ["### Speed and resources", ""]
    lines += _table(["model", *(h for _, h, _ in speed_keys)],
                    [(_code(m), *(fmt(s["speed"].get(k), nd) for k, _, nd in speed_keys))
                     for m, s in ev["models"].items()])
    routed = {m: s["actions"] for m, s in ev["models"].items() if s["actions"]}
    if routed:
        lines += ["### Actions chosen by policy-routed models", ""]
        lines += _table(["model", "actions (count)"],
                        [(_code(m), ", ".join(f"`{a}` {c}" for a, c in acts.items())) for m, acts in routed.items()])
    return lines


def _task_cell(row: Mapping) -> str:
    acc = row.get("acc")
    if not _number(acc):
        return "–"
    text = f"{100 * acc:.1f}"
    if _number(row.get("acc_stderr")):
        text += f" ± {100 * row['acc_stderr']:.1f}"
    if _number(row.get("acc_norm")):
        text += f" ({100 * row['acc_norm']:.1f})"
    return text


def _pct_or_dash(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _baselines_section(rows: Sequence[Mapping], b: Mapping) -> list[str]:
    fixed = ("method", "budget", "params", "speedup", "ppl")
    extra = sorted({k for r in rows for k, v in r.items() if k not in fixed and _number(v)})
    front = set(b.get("front", []))
    table = [(r.get("method"), fmt(r.get("budget")), fmt(r.get("params")), fmt(r.get("speedup")), fmt(r.get("ppl"), 2),
              *(fmt(r.get(k)) for k in extra), "yes" if summaries.baseline_label(r) in front else "")
             for r in rows]
    return (["## Static baselines", ""]
            + _table(["method", "budget", "parameters", "speedup (×)", "WikiText-2 PPL", *extra, "on Pareto front"],
                     table)
            + [f"Pareto front (speedup ↑, PPL ↓): {', '.join(b.get('front', [])) or '–'}", ""])


def _plots_section(plots: Mapping[str, list[Path]], run_dir: Path) -> list[str]:
    if not plots:
        return []
    lines = ["## Plots", ""]
    for name, title, _ in PLOTS:
        if name in plots:
            png, svg = (p.relative_to(run_dir).as_posix() for p in plots[name])
            lines += [f"### {title}", "", f"![{title}]({png})", "", f"[SVG]({svg})", ""]
    return lines


def _config_section(config: object) -> list[str]:
    if not config:
        return []
    return ["## Configuration", "", "<details><summary>Full config (also in config.json)</summary>", "",
            "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```", "", "</details>", ""]


# --------------------------------------------------------------------------- console summary


def console_summary(metrics: Mapping, summary: Mapping | None = None) -> str:
    """The short end-of-run summary; the same formatted numbers as the report.md tables."""
    summary = _summary(metrics, summary)
    lines = [f"{metrics.get('kind', 'run')} run" + (f" (PARTIAL: {metrics.get('partial_reason') or 'unfinished'})"
                                                     if metrics.get("partial") else "")]
    if "train" in summary:
        t = summary["train"]
        top = max(t["per_action"].items(), key=lambda kv: kv[1]["count"], default=(None, None))[0]
        lines.append(f"train: {t['n_episodes']} episodes, mean reward {fmt_ci(t['reward'])}, last {t['window']}: "
                     f"{fmt(t['reward_last'])}, final ε {fmt(t['final_epsilon'])}, most used action {top}")
    if "test" in summary:
        for g in summary["test"]["groups"]:
            s = summary["test"]["by_scenario"][g]
            lines.append(f"test [{g}] n={s['n']}: policy reward {fmt_ci(s['policy']['reward'])}, speedup "
                         f"{fmt_ci(s['policy']['speedup'])}, PPL ratio {fmt_ci(s['policy']['ppl_ratio'])}; "
                         f"regret {fmt_ci(s['regret'])}; policy − best static ({s['best_static']}) "
                         f"{fmt_ci(s['vs_best_static'])}")
    if "evaluation" in summary:
        for m, s in summary["evaluation"]["models"].items():
            lines.append(f"eval {m}: PPL {fmt(s['ppl'], 2)}, mean acc % {_pct_or_dash(s['mean_acc'])}")
    if "baselines" in summary:
        lines.append(f"baselines: {summary['baselines']['n']} rows; Pareto front: "
                     f"{', '.join(summary['baselines']['front']) or '–'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- comparison across runs


def compare(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """comparison.md (one row per run, config differences) and overlay plots across run folders."""
    runs = list(zip(_run_labels([Path(d) for d in run_dirs]), (load_metrics(d) for d in run_dirs)))
    sums = {name: summaries.summarize(m) for name, m in runs}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {name: paths for name, paths in (("comparison_reward", _overlay_reward(runs, out_dir / PLOTS_DIR)),
                                             ("comparison_pareto", _overlay_pareto(runs, sums, out_dir / PLOTS_DIR)))
             if paths}
    lines = [f"# Comparison of {len(runs)} runs", ""]
    lines += _table(["run", "kind", "model", "seed", "partial", "wall time (s)"],
                    [(_code(n), m.get("kind"), ((m.get("provenance") or {}).get("model") or {}).get("id"),
                      fmt((m.get("provenance") or {}).get("seed")), fmt(bool(m.get("partial"))),
                      fmt((m.get("provenance") or {}).get("wall_s"), 1)) for n, m in runs])
    lines += _config_diff_section(runs)
    lines += _compare_train(sums) + _compare_test(sums) + _compare_eval(sums)
    for name, paths in plots.items():
        png, svg = (p.relative_to(out_dir).as_posix() for p in paths)
        lines += [f"![{name}]({png})", "", f"[SVG]({svg})", ""]
    path = out_dir / "comparison.md"
    _atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def _run_labels(dirs: Sequence[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a name."""
    names = [d.name for d in dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def _flatten(d: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, object] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _config_diff_section(runs: Sequence[tuple[str, Mapping]]) -> list[str]:
    flat = [_flatten(m.get("config") or {}) for _, m in runs]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]
    if not differing:
        return ["Configs are identical." if len(runs) > 1 else "", ""]
    return ["## Config differences", ""] + _table(["run", *differing],
                                                   [(_code(n), *(fmt(f.get(k)) for k in differing))
                                                    for (n, _), f in zip(runs, flat)])


def _compare_train(sums: Mapping[str, Mapping]) -> list[str]:
    rows = [(_code(n), t["n_episodes"], fmt_ci(t["reward"]), fmt(t["reward_last"]), fmt(t["final_epsilon"]),
             fmt(t["loss_last"], 4))
            for n, s in sums.items() if (t := s.get("train"))]
    if not rows:
        return []
    return ["## Training", ""] + _table(["run", "episodes", "mean reward [95% CI]", "reward (last 20%)", "final ε",
                                         "loss (last 20%)"], rows)


def _compare_test(sums: Mapping[str, Mapping]) -> list[str]:
    rows = []
    for n, s in sums.items():
        for g, r in (s.get("test") or {}).get("by_scenario", {}).items():
            rows.append((_code(n), g, r["n"], fmt_ci(r["policy"]["reward"]), fmt_ci(r["policy"]["speedup"]),
                         fmt_ci(r["policy"]["ppl_ratio"]), fmt_ci(r["regret"]),
                         f"{fmt_ci(r['vs_best_static'])} vs `{r['best_static']}`", fmt_ci(r["aggressiveness"])))
    if not rows:
        return []
    return ["## Test", ""] + _table(["run", "scenario", "n", "policy reward", "speedup (×)", "PPL ratio", "regret",
                                     "policy − best static", "mean intensity"], rows)


def _compare_eval(sums: Mapping[str, Mapping]) -> list[str]:
    rows = [(_code(n), _code(m), fmt(e["ppl"], 2), fmt(e["ppl_ratio"]), _pct_or_dash(e["mean_acc"]),
             fmt(e["speed"].get("decode_tok_s"), 1))
            for n, s in sums.items() for m, e in (s.get("evaluation") or {}).get("models", {}).items()]
    if not rows:
        return []
    return ["## Evaluation", ""] + _table(["run", "model", "WikiText-2 PPL", "PPL ratio", "mean acc %",
                                           "decode tok/s"], rows)


def _overlay_reward(runs: Sequence[tuple[str, Mapping]], plots_dir: Path) -> list[Path]:
    curves = []
    for name, m in runs:
        series = summaries.per_episode_series(m.get("episodes") or [])
        pts = [(e, r) for e, r in zip(series["episode"], series["reward"]) if r is not None]
        if pts:
            curves.append((name, *zip(*pts)))
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


def _overlay_pareto(runs: Sequence[tuple[str, Mapping]], sums: Mapping[str, Mapping], plots_dir: Path) -> list[Path]:
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
