"""Report folders: metrics.json written atomically during a run, then plots and report.md from it.

A run folder explains itself: ``reports/<kind>-<YYYYmmdd-HHMMSS>-<model>/`` holds metrics.json
(raw records + provenance + a summary computed by ``summaries``), config.json, ``plots/*.png|svg``
and report.md. ``render`` rebuilds plots and report.md from metrics.json alone, so a crashed run
(partial metrics.json) or an old run can always be re-reported. report.md, the console summary
and the stored summary are all built from the same ``summaries.summarize`` dict.

This module is the public entry point (``RunDir``, ``render``, ``compare``, ``console_summary``,
``load_metrics``, ``report_markdown``); the figures live in ``reporting.plots``, the metrics.json
checks in ``reporting.schema`` and the number formatting in ``common.markdown``.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


from common.files import atomic_write_text, strict_json
from common.markdown import MISSING, fmt, fmt_ci, fmt_pct, is_number, md_cell, md_table

from reporting import offline_sections, provenance
from reporting import summaries
from environments.records import RUN_KINDS, SCHEMA_VERSION
from reporting.plots import PLOTS, overlay_pareto, overlay_reward, render_plots
from reporting.schema import validate_metrics
from reporting.study.equal_speed import equal_speed_section, lookahead_cost_lines, selection_cost_lines
from reporting.study.headroom import headroom_section
from reporting.summaries import ALL, DENSE

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"

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
        atomic_write_text(self.metrics_path, strict_json(data, indent=1))
        return self.metrics_path

    def write_config(self, config: Mapping) -> Path:
        path = self.path / CONFIG_FILE
        atomic_write_text(path, strict_json(config, default=str, indent=2, sort_keys=True))
        return path


def model_slug(model_name: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct' -> 'SmolLM2-135M-Instruct' (safe as a folder name)."""
    last = str(model_name).rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "model"


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


def _code(label: str) -> str:
    return f"`{label}`"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table followed by the blank line that ends its block."""
    return [*md_table(header, rows), ""]


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
    atomic_write_text(path, text)
    log.info("report written: %s", path)
    return path


def report_markdown(metrics: Mapping, summary: Mapping, run_name: str, plots: Mapping[str, list[Path]],
                    run_dir: Path, problems: Sequence[str] = ()) -> str:
    lines = [f"# {str(metrics.get('kind', 'run')).capitalize()} report: {run_name}", ""]
    lines += _partial_note(metrics, summary)
    if problems:
        lines += ["> **metrics.json problems** (the figures below may be incomplete):", ">"]
        lines += [f"> - {md_cell(p)}" for p in problems] + [""]
    lines += _provenance_section(metrics.get("provenance") or {}, metrics)
    load_timing = ((metrics.get("config") or {}).get("env") or {}).get("load_timing")
    if "train" in summary:
        lines += _train_section(summary["train"])
        lines += _latency_check_section(summary["train"].get("latency_check"), load_timing)
    if "test" in summary:
        lines += _test_section(summary["test"])
        lines += _latency_check_section(summary["test"].get("latency_check"), load_timing)
    lines += offline_sections.load_section(metrics.get("load_verification"), summary.get("calibrations"))
    lines += offline_sections.quality_section(summary.get("quality"))
    lines += headroom_section(summary.get("headroom"))
    lines += offline_sections.offline_train_section(metrics.get("offline"), metrics.get("action_space") or [])
    lines += offline_sections.offline_test_section(summary.get("offline_test"))
    lines += equal_speed_section(summary.get("equal_speed"))
    lines += selection_cost_lines((metrics.get("offline") or {}).get("selection"))
    lines += lookahead_cost_lines(metrics.get("config"), summary.get("offline_test"))
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
    return [f"> **Partial run.** This run did not finish ({md_cell(reason)}). The figures below cover only "
            f"{recorded} recorded before it stopped.", ""]


def _provenance_section(prov: Mapping, metrics: Mapping) -> list[str]:
    git = prov.get("git") or {}
    model = prov.get("model") or {}
    hw = prov.get("hardware") or {}
    commit = git.get("commit")
    commit_text = MISSING if not commit else f"`{commit}`" + (" (dirty)" if git.get("dirty") else "")
    params = model.get("parameters")
    model_text = MISSING if not model else (f"`{model.get('id')}` ({model.get('source') or 'unknown source'}"
                                           + (f", {params / 1e6:.1f} M parameters)" if params else ")"))
    cores = f"{hw.get('physical_cores')} physical / {hw.get('logical_cores')} logical cores"
    if hw.get("usable_cores") is not None:
        cores += f" ({hw['usable_cores']} usable)"
    hardware = MISSING if not hw else (f"{hw.get('cpu_model') or 'unknown CPU'}, {cores}, {hw.get('ram_gb')} GB RAM, "
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
        ("runtime", _runtime_text(prov.get("runtime"))),
        ("action space", f"{len(metrics.get('action_space') or [])} actions"),
        ("Python", f"{prov.get('python')} on {prov.get('platform')}" if prov.get("python") else None),
        ("libraries", libs),
        ("schema version", metrics.get("schema_version")),
    ]
    return ["## Provenance", ""] + _table(["", ""], [(k, fmt(v)) for k, v in rows])


def _runtime_text(runtime: Mapping | None) -> str | None:
    """'OpenMP stock (measured), threads 2 idle / 1 busy, torch threads 2' (runtime.openmp)."""
    omp = (runtime or {}).get("openmp")
    if not omp:
        return None
    rule = (f"threads {omp['threads_idle']} idle / {omp['threads_busy']} busy" if omp.get("threads_idle")
            else "no measured thread rule")
    threads = fmt(runtime.get("torch_threads"))
    return f"OpenMP {omp.get('policy')} ({omp.get('source')}), {rule}, torch threads {threads}"


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
    return ", ".join(fmt(e) for e in edges) or MISSING


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


def _latency_check_section(check: Mapping | None, load_timing: str | None) -> list[str]:
    """The latency table the rewards read, checked against the generations this run timed live."""
    if not check:
        return []
    how = {"scaled": "loaded entries scaled from idle by the dense slowdown",
           "measured": "loaded entries measured per action under the load"}.get(load_timing, "")
    rows = [(_code(g), c["n"], fmt_pct(c["bias"]), fmt_pct(c["error"])) for g, c in check.items()]
    text = (f"Relative error live / table − 1 of the latency the reward used ({how or 'table'}) against the "
            "same generation timed live (one raw timing each, so single errors are noisy; the median is the "
            "table's bias, > 0: live runs were slower).")
    return (["### Latency table vs live generations", "", text, ""]
            + _table(["scenario", "generations", "median error (bias)", "mean |error|"], rows))


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
             (f"policy − best static ({_code(best) if best else MISSING})", g["vs_best_static"]),
             ("policy − random", g["vs_random"]), ("policy − dense", g["vs_dense"])]
    lines = [f"### Policy vs baselines, {title} (n = {g['n']} prompts)", ""] + _table(header, rows)
    lines += _left_out_note(g)
    lines += ["Paired reward differences:", ""] + _table(["comparison", "mean [95% CI]", "CI excludes 0"],
                                                          [(k, fmt_ci(v), _excludes_zero(v)) for k, v in diffs])
    lines += [_verdict(g["vs_best_static"], best), "", _pareto_sentence(g), "",
              f"Policy agrees with the oracle on {fmt_pct(g['oracle_agreement'])} of prompts; mean intensity of its "
              f"actions: {fmt_ci(g['aggressiveness'])}.", ""]
    return lines


def _verdict(diff: Mapping | None, best: str | None) -> str:
    """The claim the run tests, stated from the paired CI: beats, loses to, or cannot tell apart."""
    name = _code(best) if best else "the best static action"
    lo, hi = (diff or {}).get("lo"), (diff or {}).get("hi")
    if not (is_number(lo) and is_number(hi)):
        return f"**Verdict:** not enough prompts to compare the policy with {name}."
    if lo > 0:
        return f"**Verdict:** the policy beats the best static action ({name}): the 95% CI of the paired reward difference excludes zero."
    if hi < 0:
        return (f"**Verdict:** the policy does not beat the best static action ({name}); it is worse, and the 95% CI "
                "excludes zero. Longer training, a richer action space or a reward whose best action depends more "
                "on load and prompt would be needed.")
    return (f"**Verdict:** the policy does not beat the best static action ({name}) in this run: the 95% CI of the "
            "paired difference includes zero, so the two cannot be told apart (more test prompts narrow the CI; "
            "more training or state-dependent rewards may separate them).")


def _left_out_note(g: Mapping) -> list[str]:
    """Name every mean that stands on fewer prompts than the group (missing or non-finite values)."""
    arms = [("policy", g["policy"]), *((f"`{a}`", s) for a, s in g["static"].items()), ("oracle", g["oracle"])]
    short = [f"{arm} {m} ({g['n'] - cis[m]['n']} of {g['n']})" for arm, cis in arms
             for m in summaries.METRICS if m in cis and cis[m]["n"] < g["n"]]
    return [f"Left out as missing or non-finite: {', '.join(short)}.", ""] if short else []


def _excludes_zero(ci: Mapping) -> str:
    if not ci or ci.get("mean") is None:
        return MISSING
    return "yes (> 0)" if ci["lo"] > 0 else "yes (< 0)" if ci["hi"] < 0 else "no"


def _pareto_sentence(g: Mapping) -> str:
    p = g["pareto"]
    front = ", ".join(_code(a) for a in p["front"]) or MISSING
    where = ("unknown (policy has no speedup or PPL ratio)" if p["policy_on_front"] is None
             else "on or beyond the static front (no static action dominates it)" if p["policy_on_front"]
             else "dominated by " + ", ".join(_code(a) for a in p["policy_dominated_by"]))
    return (f"Static Pareto front (speedup ↑, PPL ratio ↓, by mean): {front}. The policy point "
            f"({fmt(g['policy']['speedup']['mean'])}×, PPL ratio {fmt(g['policy']['ppl_ratio']['mean'])}) is {where}.")


def _ablation_section(ablations: Mapping) -> list[str]:
    rows = [(name, g, s["n"], fmt_ci(s["policy"]["reward"]), fmt_ci(s["policy"]["speedup"]),
             fmt_ci(s["policy"]["ppl_ratio"]), fmt_ci(s["vs_policy"]), fmt_ci(s["aggressiveness"]))
            for name, groups in ablations.items() for g, s in groups.items()]
    return ["### Ablations (same prompts)", ""] + _table(
        ["ablation", "scenario", "n", "mean reward [95% CI]", "speedup (×)", "PPL ratio",
         "ablation − policy reward [95% CI]", "mean intensity [95% CI]"], rows)


def _evaluation_section(ev: Mapping) -> list[str]:
    tasks = ev["tasks"]
    header = ["model", "WikiText-2 PPL", "PPL ratio", "tokens", *(f"{t} acc % (norm)" for t in tasks), "mean acc %"]
    rows = [(_code(m), fmt(s["ppl"], 2), fmt(s["ppl_ratio"]), fmt(s["tokens"]),
             *(_task_cell(s["tasks"].get(t) or {}) for t in tasks), fmt_pct(s["mean_acc"], suffix=""))
            for m, s in ev["models"].items()]
    lines = ["## Evaluation", ""] + _table(header, rows)
    protocols = {json.dumps(s["protocol"], sort_keys=True) for s in ev["models"].values() if s["protocol"]}
    for p in sorted(protocols):
        shown = (f"{k}={v!r}" if isinstance(v, str) and not v.strip() else f"{k}={v}"   # joiner="\n\n"
                 for k, v in json.loads(p).items())
        lines += ["WikiText-2 protocol: " + ", ".join(shown), ""]
    speed_keys = (("prefill_tokens_per_s", "prefill tok/s", 1), ("decode_tokens_per_s", "decode tok/s", 1),
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
    if not is_number(acc):
        return MISSING
    text = f"{100 * acc:.1f}"
    if is_number(row.get("acc_stderr")):
        text += f" ± {100 * row['acc_stderr']:.1f}"
    if is_number(row.get("acc_norm")):
        text += f" ({100 * row['acc_norm']:.1f})"
    return text


def _baselines_section(rows: Sequence[Mapping], b: Mapping) -> list[str]:
    fixed = ("method", "budget", "params", "speedup", "ppl")
    extra = sorted({k for r in rows for k, v in r.items() if k not in fixed and is_number(v)})
    front = set(b.get("front", []))
    table = [(r.get("method"), fmt(r.get("budget")), fmt(r.get("params")), fmt(r.get("speedup")), fmt(r.get("ppl"), 2),
              *(fmt(r.get(k)) for k in extra), "yes" if summaries.baseline_label(r) in front else "")
             for r in rows]
    return (["## Static baselines", ""]
            + _table(["method", "budget", "parameters", "speedup (×)", "WikiText-2 PPL", *extra, "on Pareto front"],
                     table)
            + [f"Pareto front (speedup ↑, PPL ↓): {', '.join(b.get('front', [])) or MISSING}", ""])


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
    if summary is None:
        summary = summaries.summarize(metrics)
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
    for line in (metrics.get("load_verification") or {}).get("failures") or []:
        lines.append(f"LOAD FAILED: {line}")
    if "offline_test" in summary:
        o = summary["offline_test"]
        strongest = o["strongest_baseline"]
        for g in o["groups"]:
            arms = o["by_level"][g]["arms"]
            lines.append(f"offline test [{g}]: policy reward {fmt_ci(arms['policy']['reward'])}; policy − "
                         f"{strongest} (strongest baseline) {fmt_ci(arms[strongest]['vs'])}")
        lines.append(f"verdict: {o['verdict']['claim']}")
    if "evaluation" in summary:
        for m, s in summary["evaluation"]["models"].items():
            lines.append(f"eval {m}: PPL {fmt(s['ppl'], 2)}, mean acc % {fmt_pct(s['mean_acc'], suffix='')}")
    if "baselines" in summary:
        lines.append(f"baselines: {summary['baselines']['n']} rows; Pareto front: "
                     f"{', '.join(summary['baselines']['front']) or MISSING}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- comparison across runs


def compare(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """comparison.md (one row per run, config differences) and overlay plots across run folders."""
    runs = list(zip(_run_labels([Path(d) for d in run_dirs]), (load_metrics(d) for d in run_dirs)))
    sums = {name: summaries.summarize(m) for name, m in runs}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {name: paths for name, paths in (("comparison_reward", overlay_reward(runs, out_dir / PLOTS_DIR)),
                                             ("comparison_pareto", overlay_pareto(runs, sums, out_dir / PLOTS_DIR)))
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
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
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
    rows = [(_code(n), _code(m), fmt(e["ppl"], 2), fmt(e["ppl_ratio"]), fmt_pct(e["mean_acc"], suffix=""),
             fmt(e["speed"].get("decode_tokens_per_s"), 1))
            for n, s in sums.items() for m, e in (s.get("evaluation") or {}).get("models", {}).items()]
    if not rows:
        return []
    return ["## Evaluation", ""] + _table(["run", "model", "WikiText-2 PPL", "PPL ratio", "mean acc %",
                                           "decode tok/s"], rows)
