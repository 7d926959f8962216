"""Issue 27: the headroom report's statistics on synthetic prompts whose answers are known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from reporting.headroom import PromptDamage, RoutingRow, action_rows, reliability, render, route, routing_row


def prompts(n: int, seed: int, noise: float) -> list[PromptDamage]:
    """Damage of 'a:0.4' = 3 x fragility (convex: 'a:0.2' = fragility); feature 'good' sees the fragility,
    'blind' is noise; the two halves of the reference are fragility + independent noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        f = rng.uniform(0.1, 1.0)
        halves = {"a:0.2": (f + noise * rng.normal(), f + noise * rng.normal()),
                  "a:0.4": (3 * f + noise * rng.normal(), 3 * f + noise * rng.normal())}
        out.append(PromptDamage(log_ratio={k: sum(v) / 2 for k, v in halves.items()}, half_log_ratio=halves,
                                kl={k: float(np.exp(sum(v) / 2)) for k, v in halves.items()},
                                half_kl={k: tuple(np.exp(v)) for k, v in halves.items()},
                                features={"good": [f, f * f], "blind": list(rng.normal(size=2))}))
    return out


def test_reliability_is_one_for_equal_halves_and_low_for_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    assert reliability(np.stack([x, x], 1)) == pytest.approx(1.0)
    assert abs(reliability(rng.normal(size=(200, 2)))) < 0.3


def test_route_sends_the_lowest_scored_half_to_the_high_action():
    damage = np.array([4.0, 1.0, 3.0, 2.0])
    assert route(np.array([0.0, 1.0, 2.0, 3.0]), damage) == pytest.approx((4.0 + 1.0) / 4)
    assert route(damage, damage) == pytest.approx((1.0 + 2.0) / 4)


def test_a_predictor_that_sees_fragility_reaches_the_oracle_and_noise_does_not():
    train, held = prompts(200, 0, 0.01), prompts(200, 1, 0.01)
    row = routing_row(train, held, "a:0.2", "a:0.4", [("good", "good", "log_ratio"), ("blind", "blind", "log_ratio")])
    assert row.oracle < row.uniform
    assert row.share("good") == pytest.approx(1.0, abs=0.05)
    assert row.share("good") > row.share("blind")
    assert row.gain_ci["good"][0] > 0
    rows = action_rows(train, held, ["a:0.2", "a:0.4"], ["good", "blind"])
    assert rows[1].prediction["good"] > 0.95 > rows[1].reliability - 0.1
    assert abs(rows[1].prediction["blind"]) < 0.3
    assert "| a:0.4 |" in render(rows, [row], ["good", "blind"], len(train), len(held))


def test_a_target_whose_oracle_loses_to_uniform_says_so_instead_of_a_share():
    row = RoutingRow("t", "t:0.2", "t:0.4", uniform=0.3, random=0.6, oracle=0.45, routed={"p": 0.55},
                     gain_ci={"p": (-0.3, -0.2)})
    assert math.isnan(row.share("p"))
    assert "0.550 (no oracle gain)" in render([], [row], ["p"], 1, 1)
