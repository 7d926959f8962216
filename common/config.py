"""Every option of a run, one dataclass per concern; the CLI fills them, checkpoints and reports store them.

Why one torch-free module: `adaptive_pruning.py --help` builds its flag defaults from these
dataclasses, so each default is stated exactly once and the help answers without importing
torch, transformers or lm-eval. The packages that use a config import it from here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

DEFAULT_TASKS = ("arc_easy", "hellaswag", "winogrande", "lambada_openai")
ENVIRONMENTS = ("offline", "live")
STATE_FEATURES = ("basic", "contention")
OFFLINE_GRADIENT_STEPS = 1    # offline transitions are free: one update each (live: dqn.gradient_steps, 4)


@dataclass
class EnvConfig:
    """How one episode is generated and timed (environments.live)."""
    max_new_tokens: int = 50
    timing: str = "table"              # "table": calibrated latency table; "interleaved": A B A B per episode
    load_timing: str = "scaled"        # loaded scenarios: "scaled" (idle table x measured dense slowdown) | "measured"
    calibration_tokens: int = 16       # new tokens per calibration timing
    calibration_repeats: int = 2       # interleaved (dense, pruned) pairs per table entry
    long_prompt_tokens: int = 512      # prompts this long use the "long" row of the table
    min_reference_tokens: int = 32     # a data set answer shorter than this is replaced by the dense greedy
                                       # continuation: an 8-token reference made per-prompt PPL ratios noise

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RewardConfig:
    """Speed gained against quality lost (environments.reward)."""
    alpha: float = 1.0            # weight on log(speedup)
    beta: float = 1.0             # weight on log(PPL ratio pruned/dense)
    kl_weight: float = 0.0        # weight on mean token KL(dense || pruned), nats
    energy_weight: float = 0.0    # weight on log(energy ratio dense/pruned) where energy is measured
    latency_budget: float | None = 1.1   # budget = this x idle dense latency of the prompt's bucket; None = off
    budget_weight: float = 1.0    # penalty per unit of relative budget overrun
    battery_tightening: float = 0.8  # budget multiplier when running on battery
    # Offline only: a constrained objective instead of the weighted sum, as a Lagrangian reward
    # objective - multiplier x constraint whose multiplier adapts during training (environments.reward).
    objective: str = "weighted"   # weighted | slo: best quality with the budget met on >= slo_share of requests
                                  # | quality: best speed with mean PPL ratio <= quality_budget
    slo_share: float = 0.9
    quality_budget: float = 1.2
    multiplier_lr: float = 0.05   # multiplier step per episode, times the constraint's violation (kept >= 0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DQNConfig:
    """Double DQN hyper-parameters (controller.dqn), CleanRL style."""
    hidden_sizes: tuple[int, ...] = (128, 128)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2         # L2 on the Q-network: with ~160 prompts it otherwise memorises them
                                       # (held-out reward MSE 0.94 -> 0.60, bench/q_generalization.py)
    gamma: float = 0.0                 # discount: 0 for one decision per prompt
    buffer_size: int = 10_000
    batch_size: int = 32
    learning_starts: int = 16          # transitions stored before the first gradient step
    train_frequency: int = 1           # gradient steps every N transitions
    gradient_steps: int = 4            # gradient steps each time we train
    target_update: str = "soft"        # "soft" (Polyak, tau) or "hard" (copy every N steps)
    tau: float = 0.05
    target_update_interval: int = 50
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    exploration_fraction: float = 0.5  # share of episodes over which epsilon decays linearly
    max_grad_norm: float = 10.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationConfig:
    """Text that calibrates importance scores and compensation (and the baselines' methods).

    Never evaluation data: common.calibration refuses WikiText-2 test and the lm-eval tasks' splits.
    The default gives ~25k tokens on SmolLM2's tokenizer (scores stable; the 8 "sentences" gave ~250).
    """
    dataset: str = "builtin,alpaca"     # comma-separated sources, one text from each in turn (common.calibration)
    samples: int = 512                  # texts used at most
    max_tokens: int = 256               # tokens per calibration text at most


@dataclass
class OfflineConfig:
    """The offline environment (environments.precomputed): every (prompt, action) quality outcome is
    measured once and cached, latency is calibrated K times per load level, and training samples
    (prompt, level, calibration, telemetry) and looks the outcome up."""
    calibrations: int = 5          # latency tables per load level for training, and as many again for testing
    seeds: int = 3                 # policies trained with seeds seed, seed+1, ...: the spread enters the CIs
    prompt_kl_tokens: int = 32     # KL(dense || pruned) on the prompt's last N positions (the prefill's logits)
    telemetry_draws: int = 2       # telemetry readings per (test prompt, calibration) cell
    cache_dir: str | None = None   # outcome and calibration cache (default: <project cache>/offline)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HealConfig:
    """Nested healing (--mode heal, pruners.healing): distil the prefix sub-networks from the frozen dense model.

    Full weights, not LoRA: every decoder projection (and the norms) is trained, the tied embedding is frozen.
    The sub-networks are prefixes of the same weights, so a full-weight update is what makes the units a small
    action keeps learn to stand in for the ones it drops; the result is an ordinary save_pretrained folder with
    nothing to merge; peft is not a dependency. The cost is optimizer state (2 x the trained weights: ~0.85 GB
    for SmolLM2-135M, ~8 GB for Llama-3.2-1B), which a CPU run of the embedded model affords.
    """
    out_dir: str | None = None          # healed folder (default: <project cache>/heal/<model>); checkpoint inside
    dataset: str = "builtin,alpaca"     # prompts whose dense continuations are the corpus (never evaluation data)
    samples: int = 256                  # prompts continued by the dense model
    new_tokens: int = 64                # tokens the dense model generates per prompt (sampled, seeded)
    steps: int = 200                    # optimizer steps
    batch: int = 4                      # sequences per step
    seq_len: int = 128                  # tokens per sequence (the corpus is packed into windows this long)
    lr: float = 5e-5                    # AdamW peak learning rate (linear warm-up 10 %, cosine decay)
    random_actions: int = 2             # sandwich: the full model + the smallest action + this many random ones
    save_every: int = 25                # checkpoint every N steps (and on interrupt)
    validation: int = 16                # held-out prompts (the next ones of the same sources; 0: none), continued
                                        # like the corpus and never trained on: every action's KL on them
    validate_every: int = 50            # ... at step 0, every N steps and at the end (heal.json "validation")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunConfig:
    """A train/test run (and the model/engine settings every mode shares)."""
    mode: str = "train"
    environment: str = "offline"            # "offline": cached outcomes x calibrated tables; "live": generate per episode
    state_features: str = "contention"      # "contention": + run queue, preemptions, steal, observed slowdown; "basic"
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
    importance: str = "fluctuation"         # FLAP; with global allocation + compensation it beat activation on
                                            # held-out calibration text (bench/recovery.py --stage select);
                                            # magnitude ruins SmolLM2's FFN (see README)
    allocation: str = "global"              # units per layer: global (one ranking across layers) | uniform
    recovery: str = "compensate"            # compensate (FLAP bias, least-squares layer replacement) | none
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
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    heal: HealConfig = field(default_factory=HealConfig)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalConfig:
    """Every evaluation option (evaluation.suite); stored in metrics.json."""
    wikitext: bool = True                       # score WikiText-2 perplexity
    wikitext_path: str | None = None            # --wikitext-path; None: Hub when online, else shared data
    seq_len: int = 2048                         # --eval-seq-len, capped at the model's context
    stride: int | None = None                   # --eval-stride; None = seq_len (disjoint windows)
    wikitext_samples: int | None = 200          # --wikitext-samples: first N windows only (None: all)
    tasks: tuple[str, ...] = DEFAULT_TASKS      # --eval-tasks; empty: no lm-eval
    task_data: dict[str, str] = field(default_factory=dict)   # --task-data TASK=PATH
    eval_limit: int | None = None               # --eval-limit: documents per task
    batch_size: int = 1                         # lm-eval batch size
    wikitext_batch_size: int = 1                # WikiText windows per forward (logits are B x seq_len x vocab)
    bootstrap_iters: int = 1000                 # lm-eval bootstrap for non-mean metrics (lambada perplexity)
    prune_mode: str = "structural"              # engine mode when the caller passes no engine
    speed_probe: bool = True
    probe_prompt_tokens: int = 512              # >= the engine's kv_min_tokens, so kv_cache actions apply
    probe_new_tokens: int = 32
    probe_repeats: int = 3
    progress: bool = True


def _baseline_eval() -> EvalConfig:
    return EvalConfig(tasks=(), speed_probe=False)


@dataclass
class BaselineConfig:
    """Every option of a baselines sweep (evaluation.baselines); stored in metrics.json next to the rows."""
    methods: tuple[str, ...] = ("magnitude", "wanda-sp", "taylor", "shortgpt")
    budgets: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    unstructured: tuple[str, ...] = ("magnitude:0.5", "wanda:0.5", "wanda:2:4", "sparsegpt:0.5", "sparsegpt:2:4")
    policies: tuple[str, ...] = ()             # policy checkpoints, one routed point each
    policy_importance: str | None = None       # the policies' engine criterion; None: read from the checkpoint
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    speed_prompts: int = 2                     # WikiText slices timed per point
    speed_prompt_tokens: int = 128
    speed_new_tokens: int = 32
    speed_repeats: int = 3                     # interleaved (dense, pruned) pairs per prompt
    cache_dir: str | None = None               # importance-score cache (default: the project cache)
    eval: EvalConfig = field(default_factory=_baseline_eval)


# Where the measured weight layout travels from runtime.openmp (torch-free) to model_loader.load_model.
WEIGHT_LAYOUT_ENV = "ADAPTIVE_PRUNING_WEIGHT_LAYOUT"   # row (as loaded) | column


@dataclass
class RuntimeConfig:
    """How the model runs on this machine, separately from what is pruned (runtime.governor).

    The OpenMP wait policy and the weight layout are not here: they are measured per machine and set
    before torch loads, before any flag is parsed (runtime.openmp; override with
    ADAPTIVE_PRUNING_OMP=passive|stock|spin-short and ADAPTIVE_PRUNING_WEIGHT_LAYOUT=row|column).
    """
    threads: int | None = None         # fixed torch threads; None: the measured rule per machine state
    compile: str = "auto"              # per-action compiled decode: auto (CUDA only; on CPU it measured no gain) | on | off
    busy_cores: float = 1.0            # other processes' load, in cores, from which the machine counts as busy

    def to_dict(self) -> dict:
        return asdict(self)


SERVE_POLICIES = ("dense", "static:ACTION", "slack", "rule:DEPTH:ACTION", "CHECKPOINT.pt")


@dataclass
class ServeConfig:
    """The OpenAI-compatible server (serving/, --mode serve) and its queueing simulation (environments.serving).

    The SLO is per token: token k of a request is due ``slo_ttft_ms + k * slo_tpot_ms`` after its arrival; a
    request meets the SLO when every token does. Width actions (none, ffn_neurons) leave the KV cache's shape
    alone and may change every decode step; head and layer actions shape the cache, so they change only when
    the running batch is empty (docs/serving.md).
    """
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8                  # rows decoded together (iteration-level batching)
    max_queue: int = 64                 # waiting requests beyond which the server answers 429
    policy: str = "slack"               # one of SERVE_POLICIES
    actions: tuple[str, ...] = ("none", "ffn_neurons:0.2", "ffn_neurons:0.3", "ffn_neurons:0.4", "ffn_neurons:0.5")
    slo_ttft_ms: float = 1500.0         # first token due this long after arrival
    slo_tpot_ms: float = 150.0          # every further token this much later
    max_tokens: int = 64                # a request without max_tokens gets this many at most
    step_table: str | None = None       # measured step-time table (JSON); None: measured at start, cached
    table_contexts: tuple[int, ...] = (128, 512)   # context buckets of the step-time table (tokens)

    def to_dict(self) -> dict:
        return asdict(self)
