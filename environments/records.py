"""Record types written to every run's metrics.json (schema documented in reports/README.md).

Trainer, tester, evaluator and reporter share these so a report can be rebuilt from
metrics.json alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1
RUN_KINDS = ("train", "test", "eval", "baselines")


@dataclass
class Outcome:
    """What one action did on one prompt. Ratios are pruned / dense on the same prompt."""
    action: str                       # PruningAction.label
    reward: float
    speedup: float                    # dense time / pruned time used by the reward
    ppl_ratio: float                  # teacher-forced PPL on the reference, pruned / dense
    kl: float                         # mean token KL(dense || pruned) on the reference
    latency_s: float | None = None    # measured wall time of the pruned generation
    prefill_s: float | None = None
    decode_s: float | None = None
    measured_speedup: float | None = None   # raw single-run ratio, recorded, not rewarded
    energy_j: float | None = None
    kv_applied: bool | None = None    # kv_cache actions skip prompts below the minimum length
    reward_latency_s: float | None = None   # the latency the reward used (latency-table entry or interleaved
                                            # pairs), checked against the measured latency_s in the report


@dataclass
class EpisodeRecord:
    """One training decision (one prompt, or one segment with --redecide-every)."""
    episode: int
    step: int
    prompt_id: str
    category: str | None
    prompt_tokens: int
    complexity: float
    scenario: str                     # e.g. "idle", "loaded"
    action_index: int
    explored: bool
    epsilon: float
    outcome: Outcome | None
    loss: float | None = None
    q_values: list[float] = field(default_factory=list)
    controller_s: float = 0.0         # telemetry + prompt analysis + Q-network
    failed: str | None = None         # reason when the episode raised and was skipped
    hardware: list[float] = field(default_factory=list)   # telemetry vector seen (replayable)
    truncated: bool = False           # prompt cut from the left to fit the context


@dataclass
class PromptResult:
    """Test mode: one held-out prompt under the policy, every static action and the oracle."""
    prompt_id: str
    category: str | None
    prompt_tokens: int
    complexity: float
    scenario: str
    policy_action: str
    policy: Outcome
    static: dict[str, Outcome]        # action label -> outcome (includes "none")
    oracle_action: str
    oracle_reward: float
    controller_s: float = 0.0
    truncated: bool = False


def to_jsonable(obj):
    """Dataclasses (nested) -> plain dicts; everything else unchanged."""
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, list):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj
