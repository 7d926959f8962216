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
from environments.lookahead_state import FLOOR, after_lookahead, lookahead_features, lookahead_speed
from environments.outcomes.cache import ActionQuality, OutcomeCache, PromptOutcomes, measure_prompt, precompute
from environments.outcomes.headroom import HeadroomRecord
from environments.outcomes.lookahead import measure_lookahead
from environments.precomputed import OfflineData, OfflineEnvironment
from environments.session import action_space, build_engine
from environments.state import state_feature_names

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
        for label in labels[1:]:
            ppl, kl = after_lookahead(outcome.actions[label], k)
            assert math.log(ppl) == pytest.approx(direct.after(label, k), rel=1e-5, abs=1e-6)
            assert kl == pytest.approx(direct.after(label, k, "kl"), rel=1e-5, abs=1e-7)
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


def test_after_k_quality_and_the_charged_latency_are_the_hand_computation():
    """Four new tokens, a look-ahead of one. Dense: prefill 0.1 s, 0.02 s a step; 'a' prefills in 0.08 s and steps
    in 0.01 s; 'b' (inert on this prompt) costs no forward. Choosing 'a': 0.1 + 1 x 0.02 (dense look-ahead) +
    0.08 (a's forward, its prefill) + 3 x 0.01 = 0.23 s against the dense 0.1 + 4 x 0.02 = 0.18 s."""
    table = LatencyTable({LatencyTable.key("idle", "short", "none"): entry(0.10, 0.02),
                          LatencyTable.key("idle", "short", "a"): entry(0.08, 0.01),
                          LatencyTable.key("idle", "short", "b"): entry(0.10, 0.02)})
    speedup, latency = lookahead_speed(table, "idle", "short", "a", ["a"], 4, 1, inert=False)
    assert latency == pytest.approx(0.23) and speedup == pytest.approx(0.18 / 0.23)
    speedup, latency = lookahead_speed(table, "idle", "short", "none", ["a"], 4, 1, inert=False)
    assert latency == pytest.approx(0.1 + 0.02 + 0.08 + 3 * 0.02) and speedup < 1      # dense pays the look-ahead
    assert lookahead_speed(table, "idle", "short", "b", ["a"], 4, 1, inert=True) == \
        lookahead_speed(table, "idle", "short", "none", ["a"], 4, 1, inert=False)
    outcome = PromptOutcomes("p0", 10, 4, "dense_greedy", False, {
        "none": quality([0.0] * 4, [0.0] * 4), "a": quality([0.5, 0.2, 0.1, 0.3], [0.4, 0.1, 0.3, 0.2]),
        "b": quality([0.0] * 4, [0.0] * 4, inert=True)})
    ppl, kl = after_lookahead(outcome.actions["a"], 1)
    assert math.log(ppl) == pytest.approx(0.2) and kl == pytest.approx(0.2)
    assert lookahead_features(outcome, ["none", "a", "b"], 1) == pytest.approx([math.log(0.5), math.log(FLOOR)])
    # the offline environment's matrices follow the same rules
    cs = CalibrationSet(["idle"], {"idle": 1.0}, ["short"], {})
    cs.calibrations.append(LevelCalibration("idle", 0, "train", table, [], {"short": 0.02}, None, 0.0))
    data = OfflineData([Prompt("p0", "x", "c", None, "s")], {"p0": outcome}, cs, {"p0": None})
    env = OfflineEnvironment(data, ["p0"], "train", ["none", "a", "b"], RewardConfig(latency_budget=None),
                             long_prompt_tokens=64, state_features="basic+lookahead", lookahead_tokens=1)
    assert env.latency[0, 0, 1] == pytest.approx(0.23) and env.speedup[0, 0, 1] == pytest.approx(0.18 / 0.23)
    assert env.ppl_ratio[0, 1] == pytest.approx(math.exp(0.2)) and env.kl[0, 1] == pytest.approx(0.2)
    assert np.allclose(env.lookahead[0], [math.log(0.5), math.log(FLOOR)])
    assert env.state_names[-2:] == ["lookahead.a", "lookahead.b"]
    with pytest.raises(ValueError, match="none after a look-ahead of 4: lower --lookahead-tokens"):
        OfflineEnvironment(data, ["p0"], "train", ["none", "a", "b"], RewardConfig(latency_budget=None), 64,
                           "basic+lookahead", lookahead_tokens=4)


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
