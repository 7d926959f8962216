"""Summary numbers checked by hand on tiny examples."""
from __future__ import annotations

import math

import pytest

from reporting import summaries
from environments.records import EpisodeRecord, Outcome, PromptResult, to_jsonable

FFN = "ffn_neurons:0.5"


def test_bootstrap_ci_contains_mean_and_is_seeded():
    ci = summaries.bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=3)
    assert ci["mean"] == 2.5 and ci["n"] == 4
    assert 1.0 <= ci["lo"] <= 2.5 <= ci["hi"] <= 4.0 and ci["lo"] < ci["hi"]
    assert summaries.bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=3) == ci


def test_bootstrap_ci_edge_cases():
    assert summaries.bootstrap_ci([]) == {"mean": None, "lo": None, "hi": None, "n": 0}
    assert summaries.bootstrap_ci([0.7]) == {"mean": 0.7, "lo": 0.7, "hi": 0.7, "n": 1}
    constant = summaries.bootstrap_ci([0.1] * 7)
    assert constant["lo"] <= constant["mean"] <= constant["hi"]
    assert summaries.bootstrap_ci([1.0, None, math.nan, math.inf, 3.0])["n"] == 2


def test_paired_diff_uses_pairs_only():
    ci = summaries.paired_diff_ci([3.0, 4.0, 5.0, None], [1.0, 2.0, 3.0, 9.0])
    assert ci == {"mean": 2.0, "lo": 2.0, "hi": 2.0, "n": 3}


def test_pareto_front_hand_example():
    points = {"A": (1.0, 1.0), "B": (1.2, 1.1), "C": (1.1, 1.3), "D": (1.5, 1.5), "E": (1.2, 1.2),
              "F": (math.nan, 1.0)}
    assert summaries.pareto_front(points) == ["A", "B", "D"]
    assert summaries.dominated_by(points["C"], points) == ["B", "E"]
    assert summaries.dominated_by(points["B"], points) == []
    assert summaries.dominated_by((1.0, 1.0), {"same": (1.0, 1.0)}) == []   # equal is not dominated


def test_moving_average_and_windows():
    assert summaries.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert summaries.default_window(3) == 3 and summaries.default_window(30) == 5
    assert summaries.default_window(300) == 20


def test_complexity_buckets():
    edges = summaries.complexity_edges([0.0, 0.3, 0.6, 0.9])
    assert edges == pytest.approx([0.3, 0.6])
    assert [summaries.complexity_bucket(v, edges) for v in (0.0, 0.3, 0.5, 0.6, 0.9)] == \
        ["low", "low", "mid", "mid", "high"]


def test_action_labels():
    assert summaries.action_target(FFN) == "ffn_neurons" and summaries.action_intensity(FFN) == 0.5
    assert summaries.action_target("none") == "none" and summaries.action_intensity("none") == 0.0
    assert summaries.order_actions({"b", FFN, "none"}, ["none", FFN]) == ["none", FFN, "b"]


def _o(action: str, reward: float, speedup: float = 1.0, ppl: float = 1.0) -> Outcome:
    return Outcome(action=action, reward=reward, speedup=speedup, ppl_ratio=ppl, kl=0.0, prefill_s=0.1,
                   decode_s=0.4, latency_s=0.5)


def _prompt(pid: str, scenario: str, none: Outcome, ffn: Outcome, choice: str, cx: float) -> PromptResult:
    static = {"none": none, FFN: ffn}
    oracle = max(static, key=lambda a: static[a].reward)
    return PromptResult(prompt_id=pid, category=None, prompt_tokens=10, complexity=cx, scenario=scenario,
                        policy_action=choice, policy=static[choice], static=static, oracle_action=oracle,
                        oracle_reward=static[oracle].reward, controller_s=0.01)


@pytest.fixture
def prompts() -> list[PromptResult]:
    return [_prompt("p1", "idle", _o("none", 0.0), _o(FFN, 0.3, 1.4, 1.2), FFN, 0.1),
            _prompt("p2", "idle", _o("none", 0.2), _o(FFN, -0.2, 1.3, 1.8), FFN, 0.5),
            _prompt("p3", "loaded", _o("none", 0.0), _o(FFN, 0.5, 1.5, 1.1), "none", 0.9)]


def test_summarize_test_hand_example(prompts):
    s = summaries.summarize_test(prompts, action_space=["none", FFN])
    assert s["groups"] == ["idle", "loaded", "all"] and s["n_prompts"] == 3
    idle = s["by_scenario"]["idle"]
    assert idle["policy"]["reward"]["mean"] == pytest.approx(0.05)
    assert idle["static"]["none"]["reward"]["mean"] == pytest.approx(0.1)
    assert idle["best_static"] == "none"
    assert idle["oracle"]["reward"]["mean"] == pytest.approx(0.25)
    assert idle["regret"]["mean"] == pytest.approx(0.2) and idle["regret"]["lo"] >= 0
    assert idle["vs_best_static"]["mean"] == pytest.approx(-0.05)
    assert idle["random"]["reward"]["mean"] == pytest.approx(0.075)
    assert idle["policy_actions"] == {FFN: 2} and idle["aggressiveness"]["mean"] == 0.5
    assert idle["pareto"] == {"front": ["none", FFN], "policy_dominated_by": [], "policy_on_front": True}
    assert idle["overhead"]["controller_share"] == pytest.approx(0.01 / 0.51)
    assert idle["static"][FFN]["timing"] == {"prefill_s": 0.1, "decode_s": 0.4, "latency_s": 0.5}
    loaded = s["by_scenario"]["loaded"]
    assert loaded["regret"]["mean"] == pytest.approx(0.5) and loaded["oracle_agreement"] == 0.0
    every = s["by_scenario"]["all"]
    assert every["n"] == 3 and all(every["regret"][k] >= 0 for k in ("mean", "lo", "hi"))
    assert sum(sum(c.values()) for c in every["by_complexity"].values()) == 3


def test_best_static_is_one_rule_for_the_report_and_for_lm_eval(prompts):
    """The report's per-group best static and the static model --lm-eval scores come from one function."""
    s = summaries.summarize_test(prompts, action_space=["none", FFN])
    rows = to_jsonable(prompts)
    idle = [r for r in rows if r["scenario"] == "idle"]
    assert summaries.best_static(rows) == s["by_scenario"]["all"]["best_static"] == FFN   # pooled over scenarios
    assert summaries.best_static(idle) == s["by_scenario"]["idle"]["best_static"] == "none"
    assert summaries.best_static(idle, pruning_only=True) == FFN
    tie = [{"static": {"none": {"reward": 0.1}, FFN: {"reward": 0.1}, "kv_cache:0.2": {"reward": float("nan")}}}]
    assert summaries.best_static(tie) == "none"                       # a tie goes to dense
    assert summaries.best_static(tie, pruning_only=True) == FFN       # a non-finite mean is never best
    assert summaries.best_static([{"static": {}}]) is None
    two = [{"static": {"none": {"reward": 0.0}, "kv_cache:0.2": {"reward": -0.1}, "ffn_neurons:0.2": {"reward": -0.5}}},
           {"static": {"none": {"reward": 0.0}, "kv_cache:0.2": {"reward": -0.3}, "ffn_neurons:0.2": {"reward": 0.1}}}]
    assert summaries.best_static(two) == "none" and summaries.best_static(two, pruning_only=True) == "kv_cache:0.2"


def test_dominated_policy_is_reported(prompts):
    worse = [PromptResult(**{**vars(p), "policy": _o(FFN, -1.0, 1.0, 2.0)}) for p in prompts]
    pareto = summaries.summarize_test(worse)["by_scenario"]["idle"]["pareto"]
    assert pareto["policy_on_front"] is False and pareto["policy_dominated_by"] == [FFN, "none"]


def test_ablation_is_paired_with_the_main_policy(prompts):
    ablated = [PromptResult(**{**vars(p), "policy_action": "none", "policy": p.static["none"]}) for p in prompts]
    out = summaries.summarize_test(prompts, {"no_hardware": ablated})["ablations"]
    assert out["no_hardware"]["idle"]["vs_policy"]["mean"] == pytest.approx((0.0 - 0.3 + 0.2 + 0.2) / 2)
    assert out["no_hardware"]["loaded"]["aggressiveness"]["mean"] == 0.0


def _episode(i: int, action: str | None, reward: float, explored: bool, scenario: str = "idle") -> EpisodeRecord:
    return EpisodeRecord(episode=i, step=0, prompt_id=str(i), category=None, prompt_tokens=5, complexity=i / 10,
                         scenario=scenario, action_index=0 if action in (None, "none") else 1, explored=explored,
                         epsilon=1.0 - i / 10, outcome=_o(action, reward, 1.2, 1.1) if action else None,
                         loss=float(i) if i else None, controller_s=0.002, failed=None if action else "oom")


def test_summarize_train_hand_example():
    eps = [_episode(0, "none", 0.0, True), _episode(1, FFN, 0.4, False, "loaded"), _episode(2, None, 0.0, False),
           _episode(3, FFN, 0.2, False)]
    s = summaries.summarize_train(eps, ["none", FFN])
    assert (s["n_episodes"], s["n_failed"], s["n_explored"]) == (4, 1, 1)
    assert s["per_action"][FFN]["count"] == 2 and s["per_action"][FFN]["mean_reward"] == pytest.approx(0.3)
    assert s["per_action"]["none"]["count"] == 2 and s["per_action"]["none"]["mean_reward"] == 0.0
    assert s["reward"]["mean"] == pytest.approx(0.2) and s["final_epsilon"] == pytest.approx(0.7)
    assert s["greedy_by_scenario"] == {"loaded": {FFN: 1}, "idle": {"none": 1, FFN: 1}}
    usage = summaries.windowed_action_shares(to_jsonable(eps), ["none", FFN], window=2)
    assert usage["shares"] == {"none": [0.5, 0.5], FFN: [0.5, 0.5]} and usage["start"] == [0, 2]


def test_summarize_eval_and_dispatch():
    models = {"dense": {"wikitext": {"ppl": 20.0, "tokens_scored": 10}, "tasks": {"arc": {"acc": 0.6}, "boolq": {"acc": 0.4}}},
              "static:x": {"wikitext": {"ppl": 30.0, "tokens_scored": 10}, "tasks": {"arc": {"acc": 0.5}}}}
    ev = summaries.summarize_eval({"models": models})
    assert ev["tasks"] == ["arc", "boolq"]
    assert ev["models"]["dense"]["mean_acc"] == pytest.approx(0.5) and ev["models"]["static:x"]["mean_acc"] is None
    assert ev["models"]["static:x"]["ppl_ratio"] == pytest.approx(1.5)
    out = summaries.summarize({"evaluation": {"models": models}, "episodes": [],
                               "baselines": [{"method": "m", "budget": 0.2, "speedup": 1.2, "ppl": 25.0},
                                             {"method": "m", "budget": 0.4, "speedup": 1.1, "ppl": 30.0}]})
    assert set(out) == {"evaluation", "baselines"} and out["baselines"]["front"] == ["m@0.2"]


def test_summarize_quality_split_half_reliability_hand_example():
    """Halves x = 0, 1, 2, 3 and y = 1, 0, 3, 2: r = 3 / 5 = 0.6 (deviations ±0.5, ±1.5), Spearman-Brown
    2r / (1 + r) = 0.75. An inert action is left out; the prompt-position KL is linear in the log PPL ratio."""
    halves = [(0.0, 1.0), (1.0, 0.0), (2.0, 3.0), (3.0, 2.0)]
    ratios = [0.9, 1.1, 1.3, 1.5]
    outcomes = {f"p{i}": {"reference_tokens": 32 + i, "actions": {
        FFN: {"ppl_ratio": ratios[i], "kl": 0.1 * i, "prompt_kl": 2.0 * math.log(ratios[i]) + 1.0,
              "half_log_ratio": list(halves[i]), "inert": False},
        "none": {"ppl_ratio": 1.0, "kl": 0.0, "prompt_kl": 0.0, "half_log_ratio": [0.0, 0.0], "inert": True}}}
        for i in range(4)}
    q = summaries.summarize_quality(outcomes)
    a = q["per_action"][FFN]
    assert q["n_prompts"] == 4 and q["reference_tokens"] == 33.5 and "none" not in q["per_action"]
    assert a["n"] == 4 and a["r_half"] == pytest.approx(0.6) and a["reliability"] == pytest.approx(0.75)
    assert a["improved_share"] == 0.25 and a["kl"] == pytest.approx(0.15) and a["r_prompt_kl"] == pytest.approx(1.0)
    assert q["median_reliability"] == pytest.approx(0.75)


def test_latency_check_compares_the_table_with_live_timings():
    """live / table - 1: idle 0.1 and -0.1 (bias 0, error 0.1), loaded 0.5 (a scaled table that was too
    optimistic under load); outcomes without a live timing (static actions in a test) are left out."""
    pairs = [("idle", {"latency_s": 1.1, "reward_latency_s": 1.0}), ("idle", {"latency_s": 0.9, "reward_latency_s": 1.0}),
             ("loaded", {"latency_s": 3.0, "reward_latency_s": 2.0}), ("loaded", {"latency_s": None, "reward_latency_s": 2.0}),
             ("loaded", {"latency_s": 1.0})]
    check = summaries.latency_check(pairs)
    assert check["idle"] == pytest.approx({"n": 2, "bias": 0.0, "error": 0.1})
    assert check["loaded"] == pytest.approx({"n": 1, "bias": 0.5, "error": 0.5})
    assert check["all"]["n"] == 3 and check["all"]["bias"] == pytest.approx(0.1)
    assert summaries.latency_check([]) == {}
