"""Reward: speed gained against quality lost, both measured against the dense model.

Log-ratios make a 2x speedup and a 2x perplexity increase weigh the same and keep the scale
stable across models. The latency budget is what makes hardware state matter: under load
the same action is slower, so a budget that the dense model meets when idle is missed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import RewardConfig


@dataclass
class RewardTerms:
    speed: float      # gain: alpha * log(speedup)
    quality: float    # cost: beta * log(PPL ratio)
    kl: float         # cost
    energy: float     # gain: energy_weight * log(energy dense / pruned)
    budget: float     # cost: budget_weight * relative overrun

    @property
    def total(self) -> float:
        return self.speed - self.quality - self.kl + self.energy - self.budget


OBJECTIVES = ("weighted", "slo", "quality")


def constrained_parts(cfg: RewardConfig, terms: RewardTerms, *, budget_met: bool, ppl_ratio: float) -> tuple[float, float]:
    """(objective, constraint) of a constrained objective; its Lagrangian reward is
    objective - multiplier x constraint, and the constraint's mean is <= 0 exactly when it is met.

    slo: maximise quality (-beta log PPL ratio - KL term) with the latency budget met on at least
    slo_share of requests; quality: maximise speed (alpha log speedup + energy term) with the mean PPL
    ratio at most quality_budget.
    """
    if cfg.objective == "slo":
        return -(terms.quality + terms.kl), (0.0 if budget_met else 1.0) - (1.0 - cfg.slo_share)
    if cfg.objective == "quality":
        return terms.speed + terms.energy, ppl_ratio - cfg.quality_budget
    raise ValueError(f"objective '{cfg.objective}' has no constraint: choose from {', '.join(OBJECTIVES[1:])}")


def effective_budget(cfg: RewardConfig, idle_dense_s: float | None, on_battery: bool | None) -> float | None:
    """Seconds allowed for a generation: fixed relative to the idle dense model, tighter on battery."""
    if cfg.latency_budget is None or idle_dense_s is None:
        return None
    return cfg.latency_budget * idle_dense_s * (cfg.battery_tightening if on_battery else 1.0)


def reward_terms(cfg: RewardConfig, *, speedup: float, ppl_ratio: float, kl: float,
                 latency_s: float | None = None, idle_dense_s: float | None = None,
                 energy_ratio: float | None = None, on_battery: bool | None = None) -> RewardTerms:
    """Each term separately so reports can show what drove a decision."""
    if not (speedup > 0 and ppl_ratio > 0 and math.isfinite(speedup) and math.isfinite(ppl_ratio)):
        raise FloatingPointError(f"non-finite reward inputs: speedup={speedup}, ppl_ratio={ppl_ratio}")
    budget = effective_budget(cfg, idle_dense_s, on_battery)
    overrun = 0.0
    if budget is not None and latency_s is not None:
        overrun = max(0.0, latency_s / budget - 1.0)
    energy = cfg.energy_weight * math.log(energy_ratio) if energy_ratio else 0.0
    return RewardTerms(speed=cfg.alpha * math.log(speedup), quality=cfg.beta * math.log(ppl_ratio),
                       kl=cfg.kl_weight * kl, energy=energy, budget=cfg.budget_weight * overrun)
