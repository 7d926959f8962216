"""Issue 27: the dense look-ahead as a state-feature set of the offline study (``--state-features ...+lookahead``):
its features and after-K target come from the outcome cache's own scores (equal to the look-ahead bench's direct
computation), and its reward charges the look-ahead's cost by one rule."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from common.config import CalibrationConfig, EnvConfig, RewardConfig, RunConfig
from common.data import Prompt, load_prompts
from environments.latency_calibration import CalibrationSet, LevelCalibration
from environments.latency_table import LatencyEntry, LatencyTable
from environments.live import PruningEnvironment
from environments.lookahead_state import FLOOR, lookahead_features, lookahead_speed, response_quality
from environments.outcomes.cache import ActionQuality, OutcomeCache, PromptOutcomes, measure_prompt, precompute
from environments.outcomes.headroom import HeadroomRecord
from environments.outcomes.lookahead import measure_lookahead
from environments.precomputed import OfflineData, OfflineEnvironment
from environments.session import action_space, build_engine
from environments.state import state_feature_names
from nlp_analyzer import PromptAnalyzer

CFG = RunConfig(model="tiny", device="cpu", targets=("ffn_neurons", "attention_heads", "transformer_layers"),
                intensities=(0.5,), env=EnvConfig(max_new_tokens=6, min_reference_tokens=6),
                calibration=CalibrationConfig(dataset="builtin", samples=8, max_tokens=64))
PROMPT = load_prompts("builtin").prompts[3]


def test_cached_per_position_scores_are_the_lookahead_benchs_and_give_the_state(tiny, tmp_path):
    actions = action_space(CFG)
    engine = build_engine(CFG, tiny, actions)
    env = PruningEnvironment(tiny, engine, CFG.reward, CFG.env)
    outcome = measure_prompt(env, PROMPT, actions, 4)
    ref = env.reference(PROMPT)
    record = HeadroomRecord(PROMPT.id, outcomes=None, probe={}, nlp=[], prompt_ids=ref.prompt_ids.tolist(),
                            ref_ids=ref.ref_ids.tolist())
    direct = measure_lookahead(tiny.model, engine, record, actions)
    labels = [a.label for a in actions]
    for label in labels:
        q = outcome.actions[label]
        assert q.token_kl == pytest.approx(direct.kl[label], rel=1e-5, abs=1e-7)
        assert q.token_nll_diff == pytest.approx(direct.nll_diff[label], rel=1e-5, abs=1e-6)
        assert sum(q.token_nll_diff) / len(q.token_nll_diff) == pytest.approx(math.log(q.ppl_ratio), abs=1e-5)
    for k in (1, 3):
        expected = [math.log(max(direct.lookahead_kl(label, k), FLOOR)) for label in labels[1:]]
        assert lookahead_features(outcome, labels, k) == pytest.approx(expected, rel=1e-5)
        for label in labels[1:]:      # the whole response: k dense tokens, then the action's
            ppl, kl = response_quality(outcome.actions[label], k)
            share = (outcome.reference_tokens - k) / outcome.reference_tokens
            assert math.log(ppl) == pytest.approx(share * direct.after(label, k), rel=1e-5, abs=1e-6)
            assert kl == pytest.approx(share * direct.after(label, k, "kl"), rel=1e-5, abs=1e-7)
    # a cache file written before the per-position scores is measured again, never read as zero
    cache = OutcomeCache(tmp_path, {"schema": "test"})
    old = replace(outcome, actions={k: replace(q, token_kl=None, token_nll_diff=None)
                                    for k, q in outcome.actions.items()})
    cache.store(PROMPT, old)
    assert precompute(env, cache, [PROMPT], actions, 4)[PROMPT.id].actions[labels[1]].token_kl is None
    again = precompute(env, cache, [PROMPT], actions, 4, lookahead=True)[PROMPT.id]
    assert again.has_positions(labels) and again.actions == outcome.actions


def entry(prefill: float, step: float, dense_prefill: float = 0.10, dense_step: float = 0.02) -> LatencyEntry:
    return LatencyEntry(prefill_s=prefill, decode_per_token_s=step, dense_prefill_s=dense_prefill,
                        dense_decode_per_token_s=dense_step, samples=1)


def quality(kl: list[float], diff: list[float], inert: bool = False) -> ActionQuality:
    return ActionQuality(ppl_ratio=math.exp(sum(diff) / len(diff)), kl=sum(kl) / len(kl), prompt_kl=None,
                         half_log_ratio=(0.0, 0.0), inert=inert, token_kl=kl, token_nll_diff=diff)


def hand_data(telemetry: list | None = None) -> OfflineData:
    """Four new tokens, a look-ahead of one. Dense: prefill 0.1 s, 0.02 s a step; 'a' prefills in 0.08 s and steps
    in 0.01 s; 'b' (inert on this prompt) costs no forward. Choosing 'a': 0.1 + 1 x 0.02 (dense look-ahead) +
    0.08 (a's forward, its prefill) + 3 x 0.01 = 0.23 s against the dense 0.1 + 4 x 0.02 = 0.18 s."""
    table = LatencyTable({LatencyTable.key("idle", "short", "none"): entry(0.10, 0.02),
                          LatencyTable.key("idle", "short", "a"): entry(0.08, 0.01),
                          LatencyTable.key("idle", "short", "b"): entry(0.10, 0.02)})
    outcome = PromptOutcomes("p0", 10, 4, "dense_greedy", False, {
        "none": quality([0.0] * 4, [0.0] * 4), "a": quality([0.5, 0.2, 0.1, 0.3], [0.4, 0.1, 0.3, 0.2]),
        "b": quality([0.0] * 4, [0.0] * 4, inert=True)})
    cs = CalibrationSet(["idle"], {"idle": 1.0}, ["short"], {})
    cs.calibrations.append(LevelCalibration("idle", 0, "train", table, telemetry or [], {"short": 0.02}, None, 0.0))
    features = PromptAnalyzer("regex").analyze("Explain why the sky is blue.") if telemetry else None
    return OfflineData([Prompt("p0", "x", "c", None, "s")], {"p0": outcome}, cs, {"p0": features})


def test_after_k_quality_and_the_charged_latency_are_the_hand_computation():
    """The hand computation of ``hand_data``: the look-ahead's rules, and the environment's two pricings."""
    data = hand_data()
    table, outcome = data.calibrations.calibrations[0].table, data.outcomes["p0"]
    speedup, latency = lookahead_speed(table, "idle", "short", "a", ["a"], 4, 1, inert=False)
    assert latency == pytest.approx(0.23) and speedup == pytest.approx(0.18 / 0.23)
    speedup, latency = lookahead_speed(table, "idle", "short", "none", ["a"], 4, 1, inert=False)
    assert latency == pytest.approx(0.1 + 0.02 + 0.08 + 3 * 0.02) and speedup < 1      # dense pays the look-ahead
    assert lookahead_speed(table, "idle", "short", "b", ["a"], 4, 1, inert=True) == \
        lookahead_speed(table, "idle", "short", "none", ["a"], 4, 1, inert=False)
    ppl, kl = response_quality(outcome.actions["a"], 1)     # the first token dense: (0.1 + 0.3 + 0.2) / 4
    assert math.log(ppl) == pytest.approx(0.15) and kl == pytest.approx(0.15)
    assert lookahead_features(outcome, ["none", "a", "b"], 1) == pytest.approx([math.log(0.5), math.log(FLOOR)])
    # the offline environment's matrices follow the same rules
    env = OfflineEnvironment(data, ["p0"], "train", ["none", "a", "b"], RewardConfig(latency_budget=None),
                             long_prompt_tokens=64, state_features="basic+lookahead", lookahead_tokens=1)
    assert env.latency[0, 0, 1] == pytest.approx(0.23) and env.speedup[0, 0, 1] == pytest.approx(0.18 / 0.23)
    assert env.ppl_ratio[0, 1] == pytest.approx(math.exp(0.15)) and env.kl[0, 1] == pytest.approx(0.15)
    assert np.allclose(env.lookahead[0], [math.log(0.5), math.log(FLOOR)])
    assert env.state_names[-2:] == ["lookahead.a", "lookahead.b"]
    # what reads no prompt feature runs no look-ahead: priced as an environment without one (a: 0.18 / 0.12 s)
    plain = OfflineEnvironment(data, ["p0"], "train", ["none", "a", "b"], RewardConfig(latency_budget=None),
                               long_prompt_tokens=64, state_features="basic")
    static = env.static()
    assert plain.static() is plain and static.speedup[0, 0, 1] == pytest.approx(1.5)
    assert static.ppl_ratio[0, 1] == pytest.approx(math.exp(0.25)) and static.speedup[0, 0, 0] == pytest.approx(1.0)
    for name in ("reward", "speedup", "latency", "ppl_ratio", "kl"):
        assert np.array_equal(getattr(static, name), getattr(plain, name)), name
    assert env.with_ablation("no_prompt").pricing is static.pricing is env.static_pricing
    assert env.with_ablation("none").pricing is env.pricing is not env.static_pricing
    with pytest.raises(ValueError, match="none after a look-ahead of 4: lower --lookahead-tokens"):
        OfflineEnvironment(data, ["p0"], "train", ["none", "a", "b"], RewardConfig(latency_budget=None), 64,
                           "basic+lookahead", lookahead_tokens=4)


def test_only_the_arms_that_read_the_lookahead_pay_for_it():
    """The policy and the regressor read the look-ahead and are scored on its pricing; the static actions, the
    level and rule arms and the no-prompt ablation are fitted and scored without it."""
    from controller.arms import fit_arms
    from controller.study import arms, lookahead_arms
    from environments.precomputed import evaluate_offline
    from machine.load_signals import hardware_feature_names
    from reporting.summaries import summarize_offline

    class Dense:     # an agent that always answers dense
        def q_values(self, state):
            return np.array([1.0, 0.0, 0.0])
    env = OfflineEnvironment(hand_data([[0.0] * len(hardware_feature_names("basic"))]), ["p0"], "train",
                             ["none", "a", "b"], RewardConfig(latency_budget=None), 64, "basic+lookahead",
                             lookahead_tokens=1)
    fitted = fit_arms(env, env.state_names, draws=1, seed=0)
    assert fitted.params["per_level_static"]["per_level"]["idle"] == int(np.argmax(env.static().reward[0, 0]))
    policies = {"policy": ([Dense()], "none"), "no_prompt": ([Dense()], "no_prompt")}
    assert lookahead_arms(policies) == ["policy", "regressor"]
    ot = evaluate_offline(env, arms(env, policies, fitted), 1, 0, lookahead_arms(policies))
    assert ot["lookahead"]["arms"] == ["policy", "regressor"] and ot["speedup"][0] == pytest.approx([1.0, 1.5, 1.0])
    idle = summarize_offline(ot)["by_level"]["idle"]["arms"]
    dense_after = 0.18 / (0.1 + 0.02 + 0.08 + 3 * 0.02)
    assert idle["policy"]["speedup"]["mean"] == pytest.approx(dense_after)       # dense, after the look-ahead
    assert idle["no_prompt"]["speedup"]["mean"] == idle["none"]["speedup"]["mean"] == pytest.approx(1.0)
    assert summarize_offline(ot)["lookahead"]["dense_speedup"] == {"idle": pytest.approx(dense_after)}
    with pytest.raises(ValueError, match="not among the arms"):
        evaluate_offline(env, arms(env, policies, fitted), 1, 0, ["nobody"])


def test_the_state_appends_the_lookahead_and_no_prompt_zeroes_it():
    from machine.load_signals import hardware_feature_names
    from machine.replay import RecordedHardware
    from environments.state import state_vector
    from nlp_analyzer import PromptAnalyzer
    features = PromptAnalyzer("regex").analyze("Explain why the sky is blue in two sentences.")
    hardware = RecordedHardware([0.5] * len(hardware_feature_names("basic")))
    names = state_feature_names("basic+probe+lookahead", ["dense.log_tokens"], ["none", "ffn_neurons:0.5"])
    assert names[-2:] == ["probe.dense.log_tokens", "lookahead.ffn_neurons:0.5"]
    full = state_vector(hardware, features, "none", [2.0], [-3.0])
    assert len(full) == len(names) and list(full[-2:]) == [2.0, -3.0]
    assert not state_vector(hardware, features, "no_prompt", [2.0], [-3.0])[len(hardware.vector):].any()
    with pytest.raises(ValueError, match="pruning actions"):
        state_feature_names("contention+lookahead", (), ["none"])
