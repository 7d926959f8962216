"""report.md sections of the offline study: load checks, timing noise, quality signal, baselines, verdict.

Every number comes from ``summaries`` (which reads metrics.json alone), every sentence that states a
result is chosen by a computed sign, never typed; render.report_markdown places these sections.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.markdown import MISSING, fmt, fmt_ci, fmt_pct, md_table
from controller.arms import ARM_NAMES, FittedArms
from reporting import summaries
from reporting.summaries import ALL, POLICY, REFERENCE_ARMS, ci_sign

ARM_TEXT = {POLICY: "**policy**", "per_level_static": "best static per level (told the level)",
            "worst_case_static": "static for the worst level", "rule": "one-feature threshold rule",
            "regressor": "supervised reward regressor (ridge)", "random": "random action (expected)",
            "oracle": "oracle (best action per cell)"}


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [*md_table(header, rows), ""]


def load_section(verification: Mapping | None, calibrations: Mapping | None) -> list[str]:
    """Each level's measured dense slowdown against its minimum, loudly when a level failed, and the
    telemetry features per level with their separation from idle."""
    if not verification:
        return []
    levels = verification["levels"]
    lines = ["## Load levels: verified slowdown of the dense model", ""]
    if verification["failures"]:
        lines += [f"> **LOAD FAILED.** {line}. Results under that level are not results under load." for line in
                  verification["failures"]] + [""]
    rows = []
    for name, v in levels.items():
        starts = [s for s in v["start"] if s is not None]
        splits = v.get("median_by_split") or {}      # absent in runs recorded before the per-split check
        rows.append((f"`{name}`", f"×{fmt(v['min_slowdown'], 2)}", f"×{fmt(v['median'], 2)}",
                     " / ".join(f"×{fmt(splits[s], 2)}" if s in splits else MISSING for s in ("train", "test")),
                     ", ".join(f"×{d:.2f}" for d in v["during"]) or MISSING,
                     ", ".join(f"×{s:.2f}" for s in starts) or MISSING,
                     "**FAILED**" if v["failed"] else (f"ok ({len(v['failed_checks'])} checks below)"
                                                       if v["failed_checks"] else "ok")))
    lines += ["Dense decode step per token against the same round's idle calibration (during) and against the "
              "latest idle measurement when the load started (start). A level fails when the median of its training "
              "or of its test calibrations is below its minimum.", ""]
    lines += _table(["level", "minimum", "median", "median train / test", "each calibration (during)", "at start",
                     "check"], rows)
    if calibrations:
        shown = [f for f in summaries.load_feature_names() if all(f in c["features"] for c in calibrations.values())]
        rows = [(f"`{lv}`", *(f"{fmt(c['features'][f]['mean'])} ± {fmt(c['features'][f]['sd'])}"
                              + (f" (d {c['separation'][f]:.1f})" if f in c.get("separation", {}) else "")
                              for f in shown)) for lv, c in calibrations.items()]
        lines += ["Telemetry per level (mean ± sd of the readings taken during its calibrations; d = distance "
                  "from idle in sds):", ""] + _table(["level", *shown], rows)
        errors = [(f"`{lv}`", fmt_pct(c["heldout_latency_error"])) for lv, c in calibrations.items()]
        lines += ["Timing noise: mean relative error of the training calibrations' mean latency as a prediction "
                  "of each held-out (test) calibration, per entry:", ""] + _table(["level", "error"], errors)
    return lines


def quality_section(q: Mapping | None) -> list[str]:
    if not q:
        return []
    rows = [(f"`{a}`", v["n"], fmt(v["r_half"]), fmt(v["reliability"]), fmt_pct(v["improved_share"]),
             fmt(v.get("kl")), fmt(v.get("prompt_kl")), fmt(v.get("r_prompt_kl")))
            for a, v in q["per_action"].items()]
    return ["## Quality signal", "",
            f"{q['n_prompts']} prompts, {fmt(q['reference_tokens'], 1)} reference tokens on average. Split-half "
            f"reliability of each prompt's log PPL ratio (Pearson r between the reference's halves, Spearman-Brown "
            f"full length); median {fmt(q['median_reliability'])}. 'PPL improved' is the share of prompts where "
            "pruning lowered the PPL ratio below 1, what a noisy signal produces. KL(dense ‖ pruned) per token on "
            "the reference and on the prompt's last positions (from the prefill's logits, no reference needed); "
            "r: Pearson correlation over prompts between the prompt-position KL and the reference's log PPL "
            "ratio (the reward reads the reference only).", ""] + _table(
        ["action", "prompts", "r (halves)", "reliability", "PPL improved", "KL (reference)", "KL (prompt)",
         "r (prompt KL, log PPL ratio)"], rows)


def offline_test_section(o: Mapping | None) -> list[str]:
    """Per group: every arm, policy − arm with clustered CIs, the seeds' spread; then the verdict."""
    if not o:
        return []
    lines = ["## Offline test: policy vs baselines that could beat it", "",
             f"Cells: held-out prompts × test calibrations × telemetry draws. Intervals: 95% percentile bootstrap "
             f"clustered by prompt, resampling training seeds ({o['n_seeds']}), prompts and calibrations "
             "independently (2000 resamples, seed 0). Every baseline was fitted on the training prompts and "
             "training calibrations only.", ""] + _objective_lines(o["objective"])
    for g in o["groups"]:
        row = o["by_level"][g]
        arms = row["arms"]
        shown = [POLICY, *ARM_NAMES, *(a for a in o["arms"] if a not in (POLICY, *ARM_NAMES, *REFERENCE_ARMS)
                                          and a not in o["actions"]), *REFERENCE_ARMS, row["best_static"]]
        table = []
        for a in dict.fromkeys(shown):
            v = arms[a]
            label = ARM_TEXT.get(a, f"`{a}`" + (" (best static in hindsight)" if a == row["best_static"] else ""))
            met = {True: " ✓", False: " ✗"}.get(v["meets_constraint"], "")
            table.append((label, fmt_ci(v["reward"]), fmt(v["ppl_ratio"]["mean"]) + met, fmt(v["speedup"]["mean"]),
                          fmt_pct(v["slo_met"]["mean"]) + met, fmt_ci(v["vs"]) if "vs" in v else MISSING,
                          ci_sign(v["vs"]) if "vs" in v else MISSING))
        title = "all levels pooled" if g == ALL else f"level `{g}`"
        lines += [f"### {title} ({row['n_cells']} cells)", ""]
        lines += _table(["arm", "reward [95% CI]", "PPL ratio", "speedup ×", "budget met", "policy − arm [95% CI]",
                         "policy is"], table)
        seeds = row["seeds"]
        lines += [f"Training seeds: policy reward per seed {', '.join(fmt(r) for r in seeds['reward'])} "
                  f"(sd {fmt(seeds['sd'])}); policy − {o['strongest_baseline']} per seed "
                  f"{', '.join(fmt(r) for r in seeds['vs'][o['strongest_baseline']])}.", ""]
    idle = o["by_level"].get("idle", {}).get("arms", {})
    if "no_prompt" in idle:        # at idle only the prompt features can tell requests apart
        gain = idle["no_prompt"]["vs"]
        lines += [f"Per-prompt adaptation at idle: policy − no-prompt-features ablation = {fmt_ci(gain)} "
                  f"({ci_sign(gain)}).", ""]
    lines += [f"**Verdict (computed from the CIs):** {o['verdict']['claim']}.", ""]
    return lines


def _objective_lines(objective: Mapping) -> list[str]:
    if objective["objective"] == "weighted":
        return []
    target = (f"latency budget met on ≥ {fmt_pct(objective['slo_share'])} of requests" if objective["objective"] == "slo"
              else f"mean PPL ratio ≤ {fmt(objective['quality_budget'])}")
    return [f"Objective `{objective['objective']}`: {target}; reward = objective − λ × constraint at the training "
            f"multiplier λ = {fmt(objective['multiplier'])} (✓/✗: the arm meets the constraint on these cells).", ""]


def offline_train_section(offline: Mapping | None, actions: Sequence[str]) -> list[str]:
    """The fitted arms a test will compare with, and each seed's late training reward."""
    fitted = offline and (offline.get("arms") or offline.get("baselines"))
    if not fitted:
        return []
    arms = FittedArms.from_dict(fitted)
    lines = ["## Arms fitted on the training split", "", *(f"- {line}" for line in arms.describe(list(actions))),
             f"- fitted on {len(arms.fitted_on['prompts'])} training prompts and "
             f"{len(arms.fitted_on['calibrations'])} training calibrations", ""]
    curves = offline.get("seed_rewards") or []
    if curves:
        tail = [sum(c[-max(1, len(c) // 10):]) / max(1, len(c[-max(1, len(c) // 10):])) for c in curves]
        lines += [f"Seeds {', '.join(map(str, offline.get('seeds', [])))}: mean reward over the last 10% of "
                  f"episodes {', '.join(fmt(t) for t in tail)}.", ""]
    return lines
