"""The step-time table, the serving policies and the queueing simulator (no model needed)."""
from __future__ import annotations

import math
import time

import pytest

from common.config import ServeConfig
from environments.queueing.policies import (Pending, RulePolicy, SlackPolicy, StaticPolicy, cache_signature, observe,
                                       parse_policy)
from environments.queueing.simulator import ServingSimulator, SimRequest, summarize
from environments.queueing.step_table import StepTable
from pruners.actions import NONE, PruningAction

FFN = PruningAction("ffn_neurons", 0.5)
LAYERS = PruningAction("transformer_layers", 0.2)
TABLE = StepTable(actions=("none", "ffn_neurons:0.5", "transformer_layers:0.2"), batches=(1, 2, 4), contexts=(128, 512),
                  decode_s={"none": [[0.030, 0.035], [0.032, 0.038], [0.045, 0.055]],
                            "ffn_neurons:0.5": [[0.022, 0.027], [0.024, 0.030], [0.033, 0.041]],
                            "transformer_layers:0.2": [[0.025, 0.029], [0.027, 0.031], [0.037, 0.045]]},
                  prefill_s={"none": [0.10, 0.40], "ffn_neurons:0.5": [0.08, 0.30],
                             "transformer_layers:0.2": [0.085, 0.33]})


def test_the_table_interpolates_between_measured_batches_and_buckets():
    assert TABLE.step_s("none", 1, 100) == 0.030
    assert TABLE.step_s("none", 2, 300) == 0.038
    assert TABLE.step_s("none", 3, 128) == pytest.approx((0.032 + 0.045) / 2)
    assert TABLE.step_s("none", 8, 128) == pytest.approx(0.045 * 2)        # beyond the grid: per-row cost
    assert TABLE.step_s("none", 1, 5000) == 0.035                         # beyond the buckets: the largest
    assert TABLE.prefill_time("none", 64) == pytest.approx(0.05)
    assert TABLE.prefill_time("none", 320) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="lacks"):
        StepTable(("none",), (1,), (128,), {"none": [[0.1, 0.2]]}, {"none": [0.1]})


def test_the_table_round_trips_through_json(tmp_path):
    TABLE.save(tmp_path / "t.json")
    assert StepTable.load(tmp_path / "t.json") == TABLE
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="--step-table"):
        StepTable.load(tmp_path / "bad.json")


def test_the_simulator_step_time_equals_the_table_it_was_built_from():
    cfg = ServeConfig(max_batch=4)
    sim = ServingSimulator(TABLE, cfg)
    # one request: prefill at batch 1, then one batch-1 step per token at its growing context
    solo = sim.run([SimRequest(1.0, 100, 5)], StaticPolicy(FFN), [FFN])[0]
    expected, t = [], 1.0 + TABLE.prefill_time("ffn_neurons:0.5", 100)
    expected.append(t)
    for k in range(1, 5):
        t += TABLE.step_s("ffn_neurons:0.5", 1, 100 + k - 1)
        expected.append(t)
    assert solo.token_times == pytest.approx(expected, abs=1e-12)
    # two at once: both prefilled, then batch-2 steps
    pair = sim.run([SimRequest(0.0, 50, 3), SimRequest(0.0, 60, 3)], StaticPolicy(NONE), [NONE])
    t = TABLE.prefill_time("none", 50) + TABLE.prefill_time("none", 60)
    step = TABLE.step_s("none", 2, 60)
    assert pair[1].token_times[0] == pytest.approx(t)
    assert pair[0].token_times[1] == pytest.approx(t + step) and pair[1].token_times[1] == pytest.approx(t + step)
    assert pair[0].token_times[2] - pair[0].token_times[1] == pytest.approx(TABLE.step_s("none", 2, 61))


def test_a_full_queue_rejects_and_rejected_requests_miss_the_slo():
    cfg = ServeConfig(max_batch=1, max_queue=2)
    outcomes = ServingSimulator(TABLE, cfg).run([SimRequest(0.0, 10, 50) for _ in range(6)], StaticPolicy(NONE),
                                                [NONE])
    assert sum(o.rejected for o in outcomes) == 4 and not any(o.slo_met for o in outcomes if o.rejected)
    assert summarize(outcomes)["rejected"] == 4      # all six arrive before the first admission


def test_slack_picks_the_largest_action_that_fits_and_the_fastest_when_none_does():
    policy = SlackPolicy(TABLE)
    menu = [NONE, LAYERS, FFN]
    state = observe(0.0, [Pending(0.0, 100, 32, 3)], [], [], ServeConfig(slo_ttft_ms=0, slo_tpot_ms=31), TABLE, "none",
                    100, 0.0, 1.0)
    assert state.slack_s == pytest.approx(0.031 * 3)
    assert policy.decide(state, menu) == NONE
    tight = state.__class__(**{**state.__dict__, "slack_s": 0.026})
    assert policy.decide(tight, menu) == LAYERS
    assert policy.decide(state.__class__(**{**state.__dict__, "slack_s": 0.023}), menu) == FFN
    assert policy.decide(state.__class__(**{**state.__dict__, "slack_s": -1.0}), menu) == FFN
    slow = state.__class__(**{**state.__dict__, "slack_s": 0.031, "slowdown": 1.2})   # dense 0.036, layers 0.030
    assert policy.decide(slow, menu) == LAYERS
    started = time.perf_counter()
    for _ in range(1000):
        policy.decide(tight, menu)
    assert (time.perf_counter() - started) / 1000 < 1e-3          # decision time < 1 ms per step


def test_under_overload_slack_beats_dense_in_simulation_and_serves_smaller_actions_only_when_needed():
    cfg = ServeConfig(max_batch=4, slo_ttft_ms=2000, slo_tpot_ms=40)
    light = [SimRequest(i * 2.0, 64, 16) for i in range(10)]
    heavy = [SimRequest(i * 0.15, 64, 16) for i in range(60)]     # ~1.5x dense capacity at batch 4
    sim = ServingSimulator(TABLE, cfg)
    assert {a for o in sim.run(light, SlackPolicy(TABLE), [NONE, FFN]) for a in o.actions} == {"none"}
    dense = summarize(sim.run(heavy, StaticPolicy(NONE), [NONE]))
    slack = summarize(sim.run(heavy, SlackPolicy(TABLE), [NONE, FFN]))
    assert slack["slo_attainment"] > dense["slo_attainment"] + 0.2


def test_cache_shaping_actions_wait_for_an_empty_batch():
    assert cache_signature(FFN) == cache_signature(NONE) != cache_signature(LAYERS)
    chosen = []

    class Flip:
        name = "flip"

        def decide(self, state, allowed):
            chosen.append(list(allowed))
            return allowed[-1]
    ServingSimulator(TABLE, ServeConfig(max_batch=2)).run([SimRequest(0.0, 10, 4), SimRequest(0.05, 10, 4)], Flip(),
                                                          [NONE, LAYERS])
    assert chosen[0] == [NONE, LAYERS] and chosen[1] == [LAYERS]      # the batch runs on the layer action's cache


def test_rule_and_policy_parsing():
    rule = parse_policy("rule:3:ffn_neurons:0.5", None)
    assert isinstance(rule, RulePolicy) and rule.depth == 3 and rule.action == FFN
    state = observe(0.0, [Pending(0.0, 10, 8, 1)] * 2, [], [Pending(0.0, 10, 8, 0)], ServeConfig(max_batch=2), None,
                    "none", 10, 0.0, 1.0)
    assert rule.decide(state, [NONE, FFN]) == FFN
    assert rule.decide(state.__class__(**{**state.__dict__, "queue": 0, "batch": 1}), [NONE, FFN]) == NONE
    assert parse_policy("dense", None) == StaticPolicy(NONE)
    assert parse_policy("static:ffn_neurons:0.5", None) == StaticPolicy(FFN)
    assert parse_policy("checkpoints/x.pt", None) is None
    for bad in ("rule", "rule:x:none", "static:ffn:2", "slack"):
        with pytest.raises(ValueError, match="--serve-policy"):
            parse_policy(bad, None)
    assert math.isinf(observe(0.0, [], [], [], ServeConfig(), None, "none", 0, 0.0, 1.0).slack_s)


def test_a_serving_dqn_trains_in_the_simulator_saves_loads_and_decides_among_allowed_actions(tmp_path):
    import torch

    from common.config import DQNConfig
    from controller.serving import QServePolicy, ServeReward, load_serving_policy, save_serving_policy, \
        train_serving_policy

    cfg = ServeConfig(max_batch=4, slo_ttft_ms=2000, slo_tpot_ms=40)
    menu = [NONE, FFN]
    traces = [[SimRequest(i * gap, 64, 8) for i in range(12)] for gap in (0.1, 0.5)]
    reward = ServeReward({"none": 0.0, "ffn_neurons:0.5": 0.5}, output_tokens=8)
    dqn = DQNConfig(gamma=0.9, learning_starts=16, batch_size=16, gradient_steps=1, seed=0)
    agent = train_serving_policy(ServingSimulator(TABLE, cfg), traces, menu, reward, dqn)
    assert agent.steps > 20 and agent.updates > 0
    save_serving_policy(tmp_path / "p.pt", agent, menu, cfg, reward, dqn)
    policy = load_serving_policy(tmp_path / "p.pt")
    assert isinstance(policy, QServePolicy) and policy.menu == menu
    state = observe(0.0, [Pending(0.0, 64, 8, 2)], [], [], cfg, TABLE, "none", 64, 1.0, 1.0)
    assert policy.decide(state, [FFN]) == FFN                         # only what the batch's cache allows
    started = time.perf_counter()
    for _ in range(200):
        policy.decide(state, menu)
    # well under one decode step even on this shared machine; bench/serve_study.py --stage overhead reports the
    # server's own decision-time histogram (< 1 ms per step is the target)
    assert (time.perf_counter() - started) / 200 < 5e-3
    torch.save({"not": "a serving policy"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a serving policy"):
        load_serving_policy(tmp_path / "other.pt")
