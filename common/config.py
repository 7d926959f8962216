"""Every option of a run in one place; the CLI fills it, checkpoints and reports store it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from controller.environment import EnvConfig
from controller.reward import RewardConfig
from controller.dqn import DQNConfig


@dataclass
class RunConfig:
    mode: str = "train"
    model: str = "auto"
    device: str = "auto"
    seed: int = 0
    episodes: int = 50
    checkpoint: str = "checkpoints/policy.pt"
    resume: bool = False
    train_dataset: str = "databricks/databricks-dolly-15k"
    train_samples: int = 5000
    test_dataset: str | None = None
    test_samples: int = 50
    test_fraction: float = 0.2
    structural: bool = True                 # False: masks (quality only, no speedup)
    importance: str = "activation"          # magnitude ruins SmolLM2's FFN (see README)
    targets: tuple[str, ...] = ("kv_cache", "attention_heads", "ffn_neurons", "transformer_layers")
    intensities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    scenarios: str = "idle,loaded"
    scenario_block: int = 10
    redecide_every: int = 0                 # >0: re-decide every N generated tokens (multi-step episode)
    save_every: int = 10
    save_buffer: bool = True
    latency_table: str | None = None        # reuse a saved table instead of calibrating
    telemetry_trace: str | None = None      # replay hardware states from a previous train run
    ablation: str = "none"
    nlp_backend: str = "auto"               # auto: first of spaCy, NLTK, regex within the budget; runs store the one used
    observation_budget_ms: float = 5.0      # auto's per-prompt analysis budget (<= 0: first backend that loads)
    report_dir: str = "reports"
    telemetry_hz: float = 10.0
    dqn: DQNConfig = field(default_factory=DQNConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    def to_dict(self) -> dict:
        return asdict(self)
