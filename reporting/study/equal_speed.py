"""At idle, the policy against static actions at equal mean speed (issue 27).

Why: at idle the per-level static action is mostly ``none`` (the budget is met and every pruning action costs
quality), so a policy that prunes some prompts differs from it in speed and in quality at once, and the reward's
weights decide the sign. The per-prompt question is whether choosing per prompt buys quality at the same speed.
So the policy's mean speedup over the idle test cells is matched by a static mix: a share q of the requests at
one static action and 1 - q at another, each cell valued at q x (its value under the one) + (1 - q) x (under the
other), which has the policy's mean speedup on these very cells. Of all pairs that can match it, the mix is the
one with the lowest mean log PPL ratio: the static actions' lower frontier at that speed. It is chosen on the
test cells, so it is a hindsight baseline and the conservative one: a policy that beats it beats every static
mix of its speed; a policy that loses to it may still beat a mix fitted on training data. Where the policy's
speed lies outside the static actions' range no mix matches it, and the static action nearest in speed is the
comparison instead (said so in the report).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.markdown import fmt, fmt_ci, fmt_pct, md_table
from reporting.study.pricing import arm_pricing, offline_matrices
from reporting.summaries import POLICY, _cube, ci_sign, clustered_bootstrap_ci

LEVEL = "idle"
TOLERANCE = 1e-9


def best_mix(speed: np.ndarray, log_ppl: np.ndarray, target: float) -> tuple[int, int, float] | None:
    """(low action, high action, share of high) whose mix has mean speed ``target`` at the lowest mean log PPL
    ratio; None when ``target`` is outside the actions' speeds."""
    best: tuple[float, int, int, float] | None = None
    tol = TOLERANCE * max(1.0, abs(target))
    for i in range(len(speed)):
        for j in range(len(speed)):
            if i == j and abs(speed[i] - target) <= tol:
                q = 0.0
            elif speed[i] < target - tol and target + tol < speed[j]:
                q = float((target - speed[i]) / (speed[j] - speed[i]))
            else:
                continue
            value = (1 - q) * log_ppl[i] + q * log_ppl[j]
            if best is None or value < best[0] - tol:
                best = (float(value), i, j, q)
    return None if best is None else best[1:]


def summarize_equal_speed(ot: Mapping, seed: int = 0) -> dict | None:
    """The policy at idle against the best static mix of its mean speed (or the static action nearest in speed)."""
    if LEVEL not in ot["levels"] or POLICY not in ot["arms"]:
        return None
    selected = np.asarray(ot["cells"]["level"]) == LEVEL
    keys = list(zip(ot["cells"]["prompt_id"], ot["cells"]["round"]))
    pricings = {name: {"speedup": m["speedup"], "log_ppl": np.log(m["ppl_ratio"]), "reward": m["reward"]}
                for name, m in offline_matrices(ot).items()}
    matrices = pricings["static"]          # the static actions', without a look-ahead
    cells = np.arange(len(keys))
    policy = {m: np.stack([v[cells, np.asarray(a, dtype=int)] for a in ot["arms"][POLICY]])
              for m, v in pricings[arm_pricing(ot, POLICY)].items()}
    target = float(policy["speedup"][:, selected].mean())
    speed, log_ppl = matrices["speedup"][selected].mean(0), matrices["log_ppl"][selected].mean(0)
    mix = best_mix(speed, log_ppl, target)
    low, high, share = mix if mix else (int(np.argmin(abs(speed - target))),) * 2 + (0.0,)
    static = {m: ((1 - share) * v[:, low] + share * v[:, high])[None] for m, v in matrices.items()}
    labels = ot["actions"]

    def mean(values: np.ndarray) -> float:
        return float(values[:, selected].mean())

    def vs(metric: str) -> dict:
        return clustered_bootstrap_ci(_cube(policy[metric] - static[metric], keys, selected), seed)
    return {"level": LEVEL, "matched": mix is not None,
            "policy": {"speedup": target, "ppl_ratio": float(np.exp(mean(policy["log_ppl"]))),
                       "reward": mean(policy["reward"])},
            "static": {"low": labels[low], "high": labels[high], "share_high": share,
                       "speedup": mean(static["speedup"]), "ppl_ratio": float(np.exp(mean(static["log_ppl"]))),
                       "reward": mean(static["reward"])},
            "vs_log_ppl": vs("log_ppl"), "vs_reward": vs("reward")}


def equal_speed_section(e: Mapping | None) -> list[str]:
    if not e:
        return []
    s = e["static"]
    name = (f"`{s['low']}`" if s["low"] == s["high"] else
            f"{fmt(1 - s['share_high'], 2)} × `{s['low']}` + {fmt(s['share_high'], 2)} × `{s['high']}`")
    how = ("the static mix of the same mean speed with the lowest mean log PPL ratio on these cells (a hindsight "
           "baseline: the strongest static mix at this speed)" if e["matched"] else
           "no mix of static actions reaches the policy's mean speed: the static action nearest in speed")
    quality = e["vs_log_ppl"]
    verdict = ("better quality" if quality.get("hi") is not None and quality["hi"] < 0 else
               "worse quality" if quality.get("lo") is not None and quality["lo"] > 0 else "no difference in quality")
    rows = [("**policy**", fmt(e["policy"]["speedup"]), fmt(e["policy"]["ppl_ratio"]), fmt(e["policy"]["reward"])),
            (f"static: {name}", fmt(s["speedup"]), fmt(s["ppl_ratio"]), fmt(s["reward"]))]
    return [f"### Level `{e['level']}`: the policy against static actions at equal mean speed", "",
            f"Static arm: {how}. PPL ratio: geometric mean over the cells.", "",
            *md_table(["arm", "speedup ×", "PPL ratio", "reward"], rows), "",
            f"Policy − static, log PPL ratio (negative: the policy keeps more quality) {fmt_ci(quality)} "
            f"(**{verdict}**); reward {fmt_ci(e['vs_reward'])} ({ci_sign(e['vs_reward'])}).", ""]


def selection_cost_lines(selection: Mapping | None) -> list[str]:
    """--importance probe: what choosing and gathering a request's units cost against its dense generation (not in
    the latency tables, which time the static prefix views of the same shapes)."""
    if not selection:
        return []
    return [f"Per-request unit selection + gather (`--importance probe`): median {fmt(1e3 * selection['median_s'], 1)} "
            f"ms over {selection['selections']} selections, {fmt_pct(selection['median_share_of_dense_generation'])} "
            "of the request's dense generation (median). The speedups above time the static prefix views of the same "
            "shapes and leave this cost out.", ""]


def lookahead_cost_lines(config: Mapping | None, offline_test: Mapping | None) -> list[str]:
    """--state-features ...+lookahead: what the look-ahead costs the arms that read it, read from the speedups their
    pricing charged (``environments.lookahead_state.lookahead_speed``, the one cost rule): the speedup of dense decided
    after the look-ahead is that cost alone (``summarize_offline``'s ``lookahead`` block)."""
    state = (config or {}).get("state_features", "basic")
    if not offline_test or not offline_test.get("lookahead"):
        return []
    k, paid = config["offline"]["lookahead_tokens"], offline_test["lookahead"]
    dense = ", ".join(f"×{fmt(v)} ({g})" for g, v in paid["dense_speedup"].items())
    return [f"Dense look-ahead in the state (`{state}`): the first {k} reference tokens are generated densely and "
            f"each pruning action scores them in one pruned forward before the decision. It is charged to the arms "
            f"that read it ({', '.join(f'`{a}`' for a in paid['arms']) or 'none'}): dense prefill + {k} dense steps + "
            f"one forward per action + the remaining tokens at the chosen action's step, so dense decided after it "
            f"runs at {dense}; their PPL ratio and KL are over the whole response (its first {k} tokens dense). The "
            "static actions, `random`, `oracle` and the arms that read no prompt feature run no look-ahead and are "
            "priced without it.", ""]
