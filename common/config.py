"""Every option of a run, one dataclass per concern; the CLI fills them, checkpoints and reports store them.

Why one torch-free module: `adaptive_pruning.py --help` builds its flag defaults from these
dataclasses, so each default is stated exactly once and the help answers without importing
torch, transformers or lm-eval. The packages that use a config import it from here. What each field accepts
is declared beside it (a class's ``LIMITS``) and checked by ``check_config`` before a run starts.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

DEFAULT_TASKS = ("arc_easy", "hellaswag", "winogrande", "lambada_openai")
ENVIRONMENTS = ("offline", "live")
STATE_FEATURES = ("basic", "contention")           # the hardware part of the state
PROBE = "probe"     # "+probe": the prompt's prefill-probe features join the state (environments.probe_features)
LOOKAHEAD = "lookahead"   # "+lookahead": each action's KL on a short dense look-ahead joins the state (offline only)
# what --state-features takes: a hardware kind, then any of the per-prompt model parts, always in this order
STATE_FEATURE_SETS = tuple(f"{kind}{extra}" for kind in STATE_FEATURES
                           for extra in ("", f"+{PROBE}", f"+{LOOKAHEAD}", f"+{PROBE}+{LOOKAHEAD}"))
# --importance probe: the engine keeps its static order (PROBE_STATIC, calibration fluctuation) and every request's
# heads/FFN units are re-ranked by its own prefill blended with it (pruners.scoring.probe.select_units), the
# prompt's share PROBE_BLEND (the 1:1 prior, not tuned)
PROBE_IMPORTANCE, PROBE_STATIC, PROBE_BLEND = "probe", "fluctuation", 0.5
WEIGHT_DTYPES = ("float32", "bfloat16", "int8")   # runtime.dtype: what --dtype accepts
WEIGHT_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}   # bytes per weight element (the K/V cache stays fp32)
MATVEC_KERNELS = ("auto", "native", "torch")       # runtime.matvec: what --matvec accepts
EXECUTORS = ("local", "ray")        # how the offline outcome precompute runs (environments.outcomes.fanout)
OFFLINE_GRADIENT_STEPS = 1    # offline transitions are free: one update each (live: dqn.gradient_steps, 4)


def hardware_kind(state_features: str) -> str:
    """The hardware part of a --state-features value ("contention+probe" -> "contention")."""
    return state_features.split("+", 1)[0]


def uses_probe(state_features: str) -> bool:
    """Whether a --state-features value adds the prefill-probe features."""
    return PROBE in state_features.split("+")[1:]


def uses_lookahead(state_features: str) -> bool:
    """Whether a --state-features value adds each action's KL on a short dense look-ahead
    (environments.lookahead_state)."""
    return LOOKAHEAD in state_features.split("+")[1:]


def static_importance(importance: str) -> str:
    """The criterion that orders the engine's units (probe: its static base, re-ranked per request)."""
    return PROBE_STATIC if importance == PROBE_IMPORTANCE else importance


class ConfigError(ValueError):
    """A config value outside what its field accepts (the CLI prints it as one ``error:`` line, exit 2)."""


@dataclass(frozen=True)
class Limit:
    """What one config field accepts, declared beside the field in its class's ``LIMITS``.

    Why not pydantic (installed through spaCy): its models validate on construction with messages that name
    the field, while a researcher typed a flag (``--lr``, not ``dqn.learning_rate``) or a key of a --config
    file; the configs must also stay plain dataclasses (checkpoints and reports store ``asdict``) importable
    without anything heavy, so --help stays instant. A table of bounds checked by ``check_config`` gives one
    place per field and messages that name the flag, the value and an accepted example.
    Numbers are always finite; a tuple's bounds apply to each of its items.
    """
    low: float | None = None
    high: float | None = None
    low_open: bool = False       # low itself excluded
    high_open: bool = False
    integer: bool = False
    optional: bool = False       # None accepted (the field's documented "off" / "default")
    nonempty: bool = True        # strings and tuples
    choices: tuple[str, ...] = ()
    example: str | None = None   # shown in the message (default: the field's default)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused, or None."""
        if value is None:
            return None if self.optional else "is required"
        if isinstance(value, (tuple, list)):
            if self.nonempty and not value:
                return "is empty"
            return next((f"holds {shown_value(item)}, which {p}" for item in value if (p := self._item(item))), None)
        return self._item(value)

    def _item(self, value: Any) -> str | None:
        if self.low is None and self.high is None and not self.integer:
            if not isinstance(value, str):
                return "is not text"
            if self.nonempty and not value.strip():
                return "is empty"
            if self.choices and value not in self.choices:
                return f"is not one of {', '.join(self.choices)}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not an integer" if self.integer else "is not a number"
        if self.integer and not float(value).is_integer():
            return "is not an integer"
        if not math.isfinite(value):
            return "is not a finite number"
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return None if low_ok and high_ok else f"is out of range: {self.range()}"

    def range(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {_number(self.low)}"
        high = "" if self.high is None else f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return f"must be {' and '.join(x for x in (low, high) if x)}"


def count(low: int = 1, high: int = 10**9, optional: bool = False, example: str | None = None) -> Limit:
    return Limit(low=low, high=high, integer=True, optional=optional, example=example)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           optional: bool = False, example: str | None = None) -> Limit:
    return Limit(low=low, high=high, low_open=low_open, high_open=high_open, optional=optional, example=example)


def text(*choices: str, optional: bool = False, example: str | None = None) -> Limit:
    return Limit(choices=choices, optional=optional, example=example)


def fraction(example: str | None = None) -> Limit:
    """A share strictly between 0 and 1 (an intensity, a budget, a held-out share)."""
    return number(0.0, 1.0, low_open=True, high_open=True, example=example)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def shown_value(value: Any) -> str:
    """A value as the user typed it, cut short (a 5,000-character --model is not echoed whole)."""
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    elif isinstance(value, float) and value.is_integer():
        value = _number(value)
    value = str(value)
    return repr(value[:60] + "...") if len(value) > 60 else repr(value)


def as_flag_value(value: Any) -> str:
    """A default as it would be typed on the command line (tuples comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def check_config(cfg: Any, name: Callable[[str], str] = lambda path: path, prefix: str = "") -> None:
    """Raise ConfigError on the first field of ``cfg`` (nested configs included) outside its ``LIMITS``.

    ``name`` turns a field path ("dqn.learning_rate") into what the user typed ("--lr").
    """
    limits = getattr(type(cfg), "LIMITS", {})
    for f in fields(cfg):
        value, path = getattr(cfg, f.name), prefix + f.name
        if is_dataclass(value):
            check_config(value, name, path + ".")
            continue
        limit = limits.get(f.name)
        problem = limit.problem(value) if limit else None
        if problem:
            default = f.default if f.default_factory is MISSING else f.default_factory()
            example = limit.example or (as_flag_value(default) if default not in (None, (), "") else "...")
            flag = name(path)
            raise ConfigError(f"argument {flag}: {shown_value(value)} {problem} (e.g. {flag} {example})")


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
    LIMITS: ClassVar[dict[str, Limit]] = {
        "max_new_tokens": count(1, 100_000), "timing": text("table", "interleaved"),
        "load_timing": text("scaled", "measured"), "calibration_tokens": count(1, 100_000),
        "calibration_repeats": count(1, 1000), "long_prompt_tokens": count(1, 10_000_000),
        "min_reference_tokens": count(1, 100_000)}

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
    LIMITS: ClassVar[dict[str, Limit]] = {   # weights >= 0: a negative one would reward the opposite
        "alpha": number(0, 1e6), "beta": number(0, 1e6), "kl_weight": number(0, 1e6),
        "energy_weight": number(0, 1e6), "latency_budget": number(0, 1e6, low_open=True, optional=True),
        "budget_weight": number(0, 1e6), "battery_tightening": number(0, 1, low_open=True),
        "objective": text("weighted", "slo", "quality"), "slo_share": number(0, 1, low_open=True),
        "quality_budget": number(0, 1e6, low_open=True), "multiplier_lr": number(0, 1e6)}

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
    LIMITS: ClassVar[dict[str, Limit]] = {
        "hidden_sizes": count(1, 1_000_000), "learning_rate": number(0, 10, low_open=True, example="0.001"),
        "weight_decay": number(0, 1e3), "gamma": number(0, 1), "buffer_size": count(1, 100_000_000),
        "batch_size": count(1, 1_000_000), "learning_starts": count(0, 100_000_000), "train_frequency": count(),
        "gradient_steps": count(1, 10_000), "target_update": text("soft", "hard"),
        "tau": number(0, 1, low_open=True), "target_update_interval": count(), "epsilon_start": number(0, 1),
        "epsilon_end": number(0, 1), "exploration_fraction": number(0, 1),
        "max_grad_norm": number(0, 1e9, low_open=True), "seed": count(0, 2**32 - 1)}

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
    LIMITS: ClassVar[dict[str, Limit]] = {"dataset": text(), "samples": count(1, 10_000_000),
                                          "max_tokens": count(1, 1_000_000)}


@dataclass
class EngineConfig:
    """What decides which units an action removes and how they are compensated (pruners.PruningEngine).

    The one list of engine settings: the outcome-cache key (environments.outcomes.cache), the engine a
    checkpoint's policy learned on (environments.session, modes.test) and the engine every mode builds all
    read these fields. A RunConfig is an EngineConfig plus the run's other options (its fields, flat, so the
    flags and stored configs keep their names).
    """
    structural: bool = True                 # False: masks (quality only, no speedup)
    importance: str = "fluctuation"         # FLAP; with global allocation + compensation it beat activation on
                                            # held-out calibration text (bench/recovery.py --stage select);
                                            # magnitude ruins SmolLM2's FFN (see README); "probe":
                                            # fluctuation re-ranked per request by its prefill (PROBE_IMPORTANCE)
    allocation: str = "global"              # units per layer: global (one ranking across layers) | uniform
    recovery: str = "compensate"            # compensate (FLAP bias, least-squares layer replacement) | none
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(EngineConfig))

    @classmethod
    def of(cls, cfg: "EngineConfig") -> "EngineConfig":
        """The engine settings of a run (a RunConfig, or any EngineConfig)."""
        return EngineConfig(**{name: getattr(cfg, name) for name in EngineConfig.names()})

    @classmethod
    def from_stored(cls, config: dict) -> "EngineConfig":
        """The engine a stored run config (a checkpoint's "config") was trained with; settings it lacks are
        those of the engine before they existed (``LEGACY_ENGINE``), else today's defaults."""
        stored = {**LEGACY_ENGINE, **{k: v for k, v in config.items() if k in cls.names() and v is not None}}
        return EngineConfig(**{**stored, "calibration": CalibrationConfig(**stored["calibration"])})

    def differences(self, other: "EngineConfig") -> list[tuple[str, object]]:
        """(field path, other's value) wherever ``other`` differs: "importance", "calibration.dataset", ..."""
        mine, theirs = self.to_dict(), other.to_dict()
        out = [(k, theirs[k]) for k in self.names() if k != "calibration" and mine[k] != theirs[k]]
        return out + [(f"calibration.{k}", v) for k, v in theirs["calibration"].items() if mine["calibration"][k] != v]

    def to_dict(self) -> dict:
        return asdict(self)


# The engine settings a stored config written before issue 15 lacks: those checkpoints were trained on 8
# calibration sentences (common.calibration.SENTENCES), the same share from every layer, no compensation.
LEGACY_ENGINE = {"allocation": "uniform", "recovery": "none",
                 "calibration": {"dataset": "sentences", "samples": 8, "max_tokens": 256}}


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
    lookahead_tokens: int = 8      # --state-features ...+lookahead: K reference tokens generated densely before the
                                   # decision; the state reads each action's KL on them, the decision covers the rest
    LIMITS: ClassVar[dict[str, Limit]] = {
        "calibrations": count(1, 1000), "seeds": count(1, 1000), "prompt_kl_tokens": count(1, 100_000),
        "lookahead_tokens": count(1, 100_000),
        "telemetry_draws": count(1, 1000), "cache_dir": text(optional=True, example=".cache/offline"),
        "executor": text(*EXECUTORS), "ray_address": text(optional=True, example="ray://head:10001")}
    executor: str = "local"        # outcome precompute: local (sequential) | ray (independent tasks on Ray actors)
    ray_address: str | None = None # --executor ray: a cluster's address (None: ray.init() starts a local instance)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HealConfig:
    """Nested healing (--mode heal, pruners.recovery.healing): distil the prefix sub-networks from the frozen dense model.

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
    LIMITS: ClassVar[dict[str, Limit]] = {
        "out_dir": text(optional=True, example=".cache/heal/tiny"), "dataset": text(), "samples": count(1, 10_000_000),
        "new_tokens": count(1, 100_000), "steps": count(1, 100_000_000), "batch": count(1, 100_000),
        "seq_len": count(2, 1_000_000), "lr": number(0, 1, low_open=True), "random_actions": count(0, 1000),
        "save_every": count(), "validation": count(0, 1_000_000), "validate_every": count()}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunConfig(EngineConfig):
    """A train/test run (and the model settings every mode shares); its engine settings are EngineConfig's."""
    mode: str = "train"
    environment: str = "offline"            # "offline": cached outcomes x calibrated tables; "live": generate per episode
    state_features: str = "contention"      # "contention": + run queue, preemptions, steal, observed slowdown; "basic";
                                            # either "+probe": + the prompt's prefill-probe features (offline),
                                            # "+lookahead": + each action's KL on a dense look-ahead (offline)
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
    dtype: str = "float32"                  # weight dtype the model computes in (runtime.dtype): float32 | bfloat16 | int8
    matvec: str = "auto"                    # decode's one-row products (runtime.matvec): auto | native | torch
    targets: tuple[str, ...] | None = None  # None: every registered pruning target (pruners.targets)
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
    log_to: str = "none"                    # tensorboard: episodes, rewards, losses, heal KL as event files (reporting.tracking)
    telemetry_hz: float = 10.0
    dqn: DQNConfig = field(default_factory=DQNConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    LIMITS: ClassVar[dict[str, Limit]] = {
        "mode": text("train", "test", "eval", "report", "baselines", "export", "heal", "serve"),
        "environment": text(*ENVIRONMENTS), "state_features": text(*STATE_FEATURE_SETS), "model": text(example="tiny"),
        "device": text(example="cpu"), "seed": count(0, 2**32 - 1), "episodes": count(1, 10_000_000),
        "checkpoint": text(), "train_dataset": text(example="builtin"), "train_samples": count(1, 100_000_000),
        "test_dataset": text(optional=True, example="builtin"), "test_samples": count(1, 100_000_000),
        "test_fraction": fraction(), "importance": text(), "allocation": text("global", "uniform"),
        "recovery": text("compensate", "none"), "dtype": text(*WEIGHT_DTYPES), "matvec": text(*MATVEC_KERNELS),
        "targets": text(optional=True, example="ffn_neurons,attention_heads"),
        "intensities": fraction(example="0.25,0.5"), "scenarios": text(), "scenario_block": count(),
        "redecide_every": count(0, 1_000_000, example="8"), "save_every": count(),
        "latency_table": text(optional=True, example="reports/train-.../latency_table.json"),
        "telemetry_trace": text(optional=True, example="reports/train-.../metrics.json"),
        "ablation": text("none", "no_hardware", "no_prompt"), "nlp_backend": text(),
        "observation_budget_ms": number(-1e6, 1e6),   # <= 0: no timing (documented)
        "report_dir": text(), "telemetry_hz": number(0, 1000, low_open=True)}

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
    num_fewshot: int | None = None              # --num-fewshot: lm-eval few-shot examples (None: each task's default, 0 here)
    LIMITS: ClassVar[dict[str, Limit]] = {
        "wikitext_path": text(optional=True, example="wiki.test.raw"), "seq_len": count(2, 1_000_000),
        "stride": count(1, 1_000_000, optional=True), "wikitext_samples": count(1, 100_000_000, optional=True),
        "tasks": Limit(nonempty=False), "eval_limit": count(1, 100_000_000, optional=True),
        "batch_size": count(1, 4096), "wikitext_batch_size": count(1, 4096), "bootstrap_iters": count(0, 10_000_000),
        "prune_mode": text("structural", "mask"), "probe_prompt_tokens": count(1, 1_000_000),
        "probe_new_tokens": count(1, 100_000), "probe_repeats": count(1, 1000),
        "num_fewshot": count(0, 1000, optional=True)}


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
    quantized: tuple[str, ...] = ("int8",)     # weight dtypes scored as baselines: dense and every structured point
    LIMITS: ClassVar[dict[str, Limit]] = {
        "methods": text(example="taylor,shortgpt"), "budgets": fraction(example="0.2,0.4"),
        "unstructured": Limit(nonempty=False), "policies": Limit(nonempty=False),
        "policy_importance": text(optional=True), "speed_prompts": count(1, 10_000),
        "speed_prompt_tokens": count(1, 1_000_000), "speed_new_tokens": count(1, 100_000),
        "speed_repeats": count(1, 1000), "cache_dir": text(optional=True),
        "quantized": Limit(nonempty=False)}


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
    recheck_s: float = 120.0           # a live thread check per machine state is reused this long (0: probe priors only, nothing observed)
    explore_cost: float = 0.025        # at most this share of decode time runs thread counts ranked slower (0: none)

    def to_dict(self) -> dict:
        return asdict(self)


SERVE_POLICIES = ("dense", "static:ACTION", "slack", "rule:DEPTH:ACTION", "CHECKPOINT.pt")


@dataclass
class ServeConfig:
    """The OpenAI-compatible server (serving/, --mode serve) and its queueing simulation (environments.queueing.simulator).

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
    LIMITS: ClassVar[dict[str, Limit]] = {
        "host": text(example="127.0.0.1"), "port": count(1, 65535, example="8000"), "max_batch": count(1, 1024),
        "max_queue": count(1, 1_000_000), "policy": text(example="slack"), "actions": text(example="none,ffn_neurons:0.2"),
        "slo_ttft_ms": number(0, 1e7, low_open=True), "slo_tpot_ms": number(0, 1e7, low_open=True),
        "max_tokens": count(1, 1_000_000), "step_table": text(optional=True, example="bench/serve/step_table.json"),
        "table_contexts": count(1, 10_000_000)}

    def to_dict(self) -> dict:
        return asdict(self)
