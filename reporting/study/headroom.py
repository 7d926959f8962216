"""The headroom of per-prompt decisions on the study's own prompts, from a probe-state test run's metrics.json.

Why here and not only in ``bench/headroom.py``: a study run whose state reads the probe features has, for every
training and held-out prompt, each action's damage on its reference (and on the reference's two halves) and the
features the state reads, so the headroom figures of its very prompts cost nothing more: how widely damage
varies, how reliably it is measured (split-half; sqrt(reliability) bounds any predictor's correlation), how well a
ridge on the syntax features and on the probe features, fitted on the training prompts, ranks the held-out
prompts, and what routing by it buys at equal compute (``reporting.headroom``). These explain the policy's result
against the per-level static action: a state feature can only help where it predicts damage.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict

from pruners.actions import PruningAction
from reporting.headroom import ActionRow, PromptDamage, RoutingRow, action_rows, render, routing_row

FEATURE_SETS = ("nlp", "probe")
MIN_PROMPTS = 4              # per side: fewer gives no Spearman worth printing


def _damage(outcome: Mapping, features: Mapping, labels: list[str], probe_names: list[str]) -> PromptDamage:
    from nlp_analyzer import PromptFeatures
    acts = outcome["actions"]
    return PromptDamage(log_ratio={a: math.log(acts[a]["ppl_ratio"]) for a in labels},
                        half_log_ratio={a: tuple(acts[a]["half_log_ratio"]) for a in labels},
                        kl={a: acts[a]["kl"] for a in labels}, half_kl={a: tuple(acts[a]["half_kl"]) for a in labels},
                        features={"nlp": PromptFeatures(**features).vector,
                                  "probe": [outcome["probe"][n] for n in probe_names]})


def usable(outcome: Mapping, label: str) -> bool:
    q = outcome["actions"].get(label)
    return q is not None and not q["inert"] and q.get("half_kl") is not None


def summarize_headroom(offline: Mapping) -> dict | None:
    """Damage rows and equal-compute routing rows (``reporting.headroom``), training prompts from
    ``headroom_train``, held-out prompts from the run's own outcomes; None without probe features on both sides."""
    train_block = offline.get("headroom_train") or {}
    sides = [(train_block.get("outcomes") or {}, train_block.get("features") or {}),
             (offline.get("outcomes") or {}, offline.get("features") or {})]
    if any(len(outcomes) < MIN_PROMPTS or any(o.get("probe") is None for o in outcomes.values())
           for outcomes, _ in sides):
        return None
    everything = [o for outcomes, _ in sides for o in outcomes.values()]
    probe_names = [n for n in everything[0]["probe"] if all(n in o["probe"] for o in everything)]
    labels = [a for a in everything[0]["actions"] if a != "none" and all(usable(o, a) for o in everything)]
    train, held = ([_damage(o, features[pid], labels, probe_names) for pid, o in outcomes.items()]
                   for outcomes, features in sides)
    by_target: dict[str, dict[float, str]] = {}
    for label in labels:
        action = PruningAction.parse(label)
        by_target.setdefault(action.target, {})[round(action.intensity, 6)] = label
    pairs = [(levels[r], levels[round(2 * r, 6)]) for levels in by_target.values() for r in sorted(levels)
             if round(2 * r, 6) in levels]
    predictors = [(s, s, "log_ratio") for s in FEATURE_SETS]
    return {"n_train": len(train), "n_held": len(held), "probe_features": len(probe_names),
            "actions": [asdict(r) for r in action_rows(train, held, labels, FEATURE_SETS)],
            "routing": [asdict(routing_row(train, held, low, high, predictors)) for low, high in pairs]}


def headroom_section(h: Mapping | None) -> list[str]:
    if not h:
        return []
    rows = [ActionRow(**r) for r in h["actions"]]
    routing = [RoutingRow(**{**r, "gain_ci": {k: tuple(v) for k, v in r["gain_ci"].items()}}) for r in h["routing"]]
    return ["## Per-prompt headroom on this study's prompts", "",
            f"Damage per action on the held-out prompts; ridge predictors on the syntax features (`nlp`) and on the "
            f"{h['probe_features']} probe features the state reads (`probe`), fitted on the training prompts. "
            "Equal compute: uniform intensity r on every prompt against 2r on the half each predictor picks and "
            "none on the rest.", "", render(rows, routing, FEATURE_SETS, h["n_train"], h["n_held"]), ""]
