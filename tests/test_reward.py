import math

import pytest

from environments.reward import RewardConfig, reward_terms


def test_reward_trades_speed_against_quality():
    cfg = RewardConfig(alpha=1.0, beta=1.0, latency_budget=None)
    assert reward_terms(cfg, speedup=1.0, ppl_ratio=1.0, kl=0.0).total == 0.0
    assert reward_terms(cfg, speedup=2.0, ppl_ratio=2.0, kl=0.0).total == pytest.approx(0.0)
    assert reward_terms(cfg, speedup=1.5, ppl_ratio=1.1, kl=0.0).total == pytest.approx(math.log(1.5) - math.log(1.1))


def test_budget_penalises_overrun_and_tightens_on_battery():
    cfg = RewardConfig(latency_budget=1.0, budget_weight=2.0, battery_tightening=0.5)
    ok = reward_terms(cfg, speedup=1.0, ppl_ratio=1.0, kl=0.0, latency_s=1.0, idle_dense_s=1.0)
    assert ok.budget == 0.0
    over = reward_terms(cfg, speedup=1.0, ppl_ratio=1.0, kl=0.0, latency_s=1.5, idle_dense_s=1.0)
    assert over.budget == pytest.approx(1.0)
    battery = reward_terms(cfg, speedup=1.0, ppl_ratio=1.0, kl=0.0, latency_s=1.0, idle_dense_s=1.0, on_battery=True)
    assert battery.budget == pytest.approx(2.0)


def test_non_finite_inputs_raise():
    with pytest.raises(FloatingPointError):
        reward_terms(RewardConfig(), speedup=float("nan"), ppl_ratio=1.0, kl=0.0)
    with pytest.raises(FloatingPointError):
        reward_terms(RewardConfig(), speedup=1.0, ppl_ratio=float("inf"), kl=0.0)
