"""Every CLI flag: its config field, type, help, and the modes in which it does something.

Why a table: one parser serves six modes, and a flag that is accepted but ignored misleads a
researcher. Each flag names the modes where it has an effect; any other mode refuses it with one
``error:`` line (exit 2). Defaults are read from the config dataclasses (common.config), so
``--help`` and the code cannot disagree, and this module imports no torch (``--help`` is instant).

Each mode gets its own parser (``--mode train --help`` lists train's flags, in groups); a usage error is one
line naming the flag, the value and an example. Values are checked against the limits declared beside the
config fields (common.config ``LIMITS``) by ``check_values``; ``--config FILE`` fills unset flags from a
run.yaml or a run's own config.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

from common.config import (DEFAULT_TASKS, ENVIRONMENTS, OFFLINE_GRADIENT_STEPS, BaselineConfig, CalibrationConfig,
                           EvalConfig, RunConfig, ServeConfig, as_flag_value, check_config, shown_value)
from common.config import MATVEC_KERNELS, SERVE_POLICIES, WEIGHT_DTYPES, hardware_kind, uses_lookahead

MODES = ("train", "test", "eval", "report", "baselines", "export", "heal", "serve")
TRAIN, TEST, EVAL, BASELINES, EXPORT, HEAL = "train", "test", "eval", "baselines", "export", "heal"
SERVE = "serve"
MODEL_MODES = (TRAIN, TEST, EVAL, BASELINES, EXPORT, HEAL, SERVE)
LIVE, OFFLINE = ("live",), ("offline",)
LM_EVAL_MODES = (TEST, EVAL, BASELINES)
ENGINE_MODES = (TRAIN, TEST, EVAL, EXPORT, HEAL, SERVE)   # build the run's own PruningEngine (baselines: each method's)
EXIT_USAGE = 2
log = logging.getLogger(__name__)


class UsageError(ValueError):
    """A flag or value that cannot work in the chosen mode (the CLI prints it as one line, exit 2)."""


OFF = "off"   # what --latency-budget none|off|0 parses to; the config gets None (no budget)


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def latency_budget(text: str) -> float | str:
    """A multiple of the idle dense latency; none, off or 0 switch the budget off (its range: common.config)."""
    return OFF if text.strip().lower() in ("none", "off", "0") else float(text)


def weight_dtype(text: str) -> str:
    if text not in WEIGHT_DTYPES:
        raise ValueError(text)      # the flag's parser words it (KINDS), with the value cut short
    return text


def matvec_choice(text: str) -> str:
    if text not in MATVEC_KERNELS:
        raise ValueError(text)
    return text


def weight_dtypes(text: str) -> tuple[str, ...]:
    names = words(text)
    return () if names == ("none",) else tuple(weight_dtype(n) for n in names)


KINDS = {int: "an integer", float: "a number", floats: "comma-separated numbers",
         latency_budget: "a number or 'none'",
         weight_dtype: "one of " + " | ".join(WEIGHT_DTYPES), matvec_choice: "one of " + " | ".join(MATVEC_KERNELS),
         weight_dtypes: "comma-separated weight dtypes or 'none'"}


@dataclass(frozen=True)
class Flag:
    """One option: where its value goes (``root.field``), and where it has an effect."""
    name: str
    dest: str                     # "run.episodes", "run.env.max_new_tokens", "eval.seq_len", "cli.action", ...
    help: str
    modes: tuple[str, ...]
    type: Callable[[str], Any] | None = str
    switch: bool = False          # store_true
    repeat: bool = False          # action="append"
    metavar: str | None = None
    requires: str | None = None   # another flag without which this one does nothing
    environments: tuple[str, ...] = ENVIRONMENTS   # train/test: the --environment values where it has an effect
    aliases: tuple[str, ...] = ()  # older names, still accepted

    @property
    def attr(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def numeric(self) -> bool:
        return self.type in KINDS


_R = "run."
FLAGS: tuple[Flag, ...] = (
    # ---- model and engine (every mode that loads a model)
    Flag("--model", _R + "model", "auto | smollm2-135m | tiny | llama-3.2-1b-shape | HF id | local dir", MODEL_MODES),
    Flag("--device", _R + "device", "auto | cpu | cuda | cuda:N", MODEL_MODES),
    Flag("--importance", _R + "importance", "unit ordering: fluctuation (FLAP) | activation | magnitude | "
         "block_influence | taylor (heal: the order healing starts from, stored in the folder) | probe (train/test "
         "offline: fluctuation, with each request's heads/FFN units re-ranked by its own prefill blended 1:1 with it)",
         ENGINE_MODES),
    Flag("--targets", _R + "targets", "pruning targets in the action space (comma-separated; default: every "
         "registered target; heal: the sub-networks trained)", (TRAIN, TEST, EVAL, HEAL), type=words),
    Flag("--intensities", _R + "intensities", "intensities per target (comma-separated fractions)",
         (TRAIN, TEST, EVAL, HEAL), type=floats),
    Flag("--structural", "cli.structural", "slice weights: real speedups (default unless STRUCTURAL_PRUNING=0 "
         "in .env)", (TRAIN, TEST, EVAL), type=None, switch=True),
    Flag("--dtype", _R + "dtype", "weight dtype the model computes in: float32 | bfloat16 | int8 (int8/bf16 shadows "
         "that every pruning action's prefix views read; docs/runtime.md)", (TRAIN, TEST, EVAL), type=weight_dtype),
    Flag("--matvec", _R + "matvec", "decode's one-row matrix products: auto (our multi-threaded kernel, "
         "runtime/matvec.cpp, built once per machine, where it builds vectorised on a CPU; else torch's) | native "
         "(insist) | torch (docs/runtime.md)", (TRAIN, TEST, EVAL, BASELINES, SERVE), type=matvec_choice),
    Flag("--mask", "cli.mask", "zero units with hooks: quality only, NO speedup", (TRAIN, TEST, EVAL),
         type=None, switch=True),
    Flag("--allocation", _R + "allocation", "units removed per layer: global (one ranking across layers) | uniform "
         "(the same share from every layer)", ENGINE_MODES),
    Flag("--recovery", _R + "recovery", "compensate (FLAP bias for heads/FFN, least-squares linear replacement of "
         "dropped layers; training-free) | none", ENGINE_MODES),
    Flag("--long-prompt-tokens", _R + "env.long_prompt_tokens", "prompts this long are 'long' (KV pruning applies)",
         (TRAIN, TEST, EVAL), type=int),
    Flag("--report-dir", _R + "report_dir", "folder for report folders", (TRAIN, TEST, EVAL, BASELINES)),
    Flag("--log-to", _R + "log_to", "none | tensorboard: episodes, rewards, losses (train) and KL (heal) as event "
         "files in the run folder's tensorboard/ (heal: the heal folder's)", (TRAIN, HEAL)),
    # ---- data
    Flag("--seed", _R + "seed", "seed for data order, exploration, network init (heal: corpus sampling, "
         "batches, sandwich members)", (TRAIN, TEST, HEAL), type=int),
    Flag("--checkpoint", _R + "checkpoint", "policy checkpoint to write (train) or read (test)", (TRAIN, TEST)),
    Flag("--train-dataset", _R + "train_dataset", "builtin | local .jsonl/.json/.csv (Dolly or Alpaca schema) | HF id "
         "(test: the held-out split of it)", (TRAIN, TEST)),
    Flag("--train-samples", _R + "train_samples", "training prompts used at most", (TRAIN,), type=int),
    Flag("--test-fraction", _R + "test_fraction", "share of the data set held out for testing", (TRAIN, TEST),
         type=float),
    Flag("--test-dataset", _R + "test_dataset", "test prompts (default: held-out split of the training data set)",
         (TEST,)),
    Flag("--test-samples", _R + "test_samples", "held-out prompts evaluated in test mode", (TEST,), type=int),
    Flag("--test-scenarios", "cli.test_scenarios", "scenarios for test mode (default: the training ones)", (TEST,)),
    Flag("--ablation-checkpoints", "cli.ablation_checkpoints", "policies trained with --ablation (comma-separated "
         "checkpoints), scored on the same prompts and observations and paired with --checkpoint's policy",
         (TEST,), type=words),
    # ---- controller: environment, contention, state, timing
    Flag("--environment", _R + "environment", "offline: quality of every (prompt, action) measured once and cached, "
         "latency calibrated --calibrations times per load level, episodes looked up (10,000 in seconds) | live: "
         "generate and score every episode", (TRAIN, TEST)),
    Flag("--scenarios", _R + "scenarios", "load levels: idle,light,moderate,heavy,stream,loaded,memory "
         "(comma-separated; offline needs idle)", (TRAIN, TEST)),
    Flag("--state-features", _R + "state_features", "basic (telemetry) | contention (+ run queue, preemptions, "
         "steal, observed slowdown of the model's own decode steps); either +probe (offline: + the prompt's "
         "prefill-probe features: dense statistics, logit lens, each action's injected error), +lookahead "
         "(offline: + each action's KL on the first --lookahead-tokens tokens generated densely; the decision "
         "covers the rest), or +probe+lookahead", (TRAIN,)),
    Flag("--lookahead-tokens", _R + "offline.lookahead_tokens", "--state-features ...+lookahead: reference tokens "
         "generated densely before the decision (their cost is charged in the speedup)", (TRAIN,), type=int,
         environments=OFFLINE),
    Flag("--calibrations", _R + "offline.calibrations", "latency tables per load level for training (as many "
         "again for testing)", (TRAIN, TEST), type=int, environments=OFFLINE),
    Flag("--train-seeds", _R + "offline.seeds", "policies trained with seeds --seed, --seed+1, ... (their "
         "spread enters the test's intervals)", (TRAIN,), type=int, environments=OFFLINE),
    Flag("--prompt-kl-tokens", _R + "offline.prompt_kl_tokens", "KL(dense||pruned) on the prompt's last N "
         "positions", (TRAIN, TEST), type=int, environments=OFFLINE),
    Flag("--telemetry-draws", _R + "offline.telemetry_draws", "telemetry readings per (prompt, calibration) "
         "when fitting baselines and testing", (TRAIN, TEST), type=int, environments=OFFLINE),
    Flag("--offline-cache", _R + "offline.cache_dir", "folder of the outcome and calibration cache "
         "(default: .cache/offline)", (TRAIN, TEST), environments=OFFLINE),
    Flag("--executor", _R + "offline.executor", "outcome precompute: local (sequential) | ray (independent "
         "tasks on Ray actors; ray.init() starts a local instance unless --ray-address)", (TRAIN, TEST),
         environments=OFFLINE),
    Flag("--ray-address", _R + "offline.ray_address", "a Ray cluster's address for --executor ray",
         (TRAIN, TEST), environments=OFFLINE),
    Flag("--min-reference-tokens", _R + "env.min_reference_tokens", "a data set answer shorter than this is "
         "replaced by the dense greedy continuation", (TRAIN, TEST), type=int),
    Flag("--latency-table", _R + "latency_table", "reuse a latency_table.json (or a run's metrics.json) from an "
         "earlier run (reproducibility)", (TRAIN, TEST), environments=LIVE),
    Flag("--telemetry-trace", _R + "telemetry_trace", "replay hardware states from an earlier train run's "
         "metrics.json", (TRAIN, TEST), environments=LIVE),
    Flag("--nlp-backend", _R + "nlp_backend", "prompt analysis: auto (first of spaCy, NLTK, regex within the "
         "budget) | spacy | nltk | regex", (TRAIN, TEST)),
    Flag("--observation-budget-ms", _R + "observation_budget_ms", "auto's per-prompt analysis budget in ms "
         "(<= 0: no timing)", (TRAIN, TEST), type=float),
    Flag("--telemetry-hz", _R + "telemetry_hz", "background telemetry sampling rate", (TRAIN, TEST), type=float),
    Flag("--max-new-tokens", _R + "env.max_new_tokens", "tokens generated per prompt (EOS ignored while timing)",
         (TRAIN, TEST), type=int),
    Flag("--timing", _R + "env.timing", "table (calibrated interleaved latency table) | interleaved (A B A B per "
         "episode)", (TRAIN, TEST), environments=LIVE),
    Flag("--load-timing", _R + "env.load_timing", "loaded scenarios' latency table: scaled (idle table x the dense "
         "slowdown measured under the load) | measured (interleaved pairs per action under the load; offline "
         "always measures)", (TRAIN, TEST), environments=LIVE),
    Flag("--calibration-tokens", _R + "env.calibration_tokens", "new tokens per latency-table timing",
         (TRAIN, TEST), type=int),
    Flag("--calibration-repeats", _R + "env.calibration_repeats", "interleaved pairs per latency-table entry",
         (TRAIN, TEST), type=int),
    # ---- reward (test re-scores with explicit overrides)
    Flag("--alpha", _R + "reward.alpha", "reward weight on log speedup", (TRAIN, TEST), type=float),
    Flag("--beta", _R + "reward.beta", "reward weight on log PPL ratio", (TRAIN, TEST), type=float),
    Flag("--kl-weight", _R + "reward.kl_weight", "reward weight on token KL(dense||pruned)", (TRAIN, TEST), type=float),
    Flag("--energy-weight", _R + "reward.energy_weight", "reward weight on log energy ratio (where measurable)",
         (TRAIN, TEST), type=float),
    Flag("--latency-budget", _R + "reward.latency_budget", "budget as a multiple of idle dense latency, or 'none'",
         (TRAIN, TEST), type=latency_budget),
    Flag("--budget-weight", _R + "reward.budget_weight", "penalty per unit of relative budget overrun",
         (TRAIN, TEST), type=float),
    Flag("--objective", _R + "reward.objective", "weighted (the reward above) | slo (best quality with the latency "
         "budget met on >= --slo-share of requests) | quality (best speed with mean PPL ratio <= --quality-budget); "
         "constrained ones are Lagrangian rewards whose multiplier adapts in training", (TRAIN,), environments=OFFLINE),
    Flag("--slo-share", _R + "reward.slo_share", "share of requests that must meet the latency budget (--objective "
         "slo)", (TRAIN,), type=float, environments=OFFLINE),
    Flag("--quality-budget", _R + "reward.quality_budget", "largest mean PPL ratio allowed (--objective quality)",
         (TRAIN,), type=float, environments=OFFLINE),
    Flag("--multiplier-lr", _R + "reward.multiplier_lr", "Lagrange multiplier step per episode (constrained "
         "objectives)", (TRAIN,), type=float, environments=OFFLINE),
    # ---- training only
    Flag("--episodes", _R + "episodes", "training episodes (one prompt each)", (TRAIN,), type=int),
    Flag("--resume", _R + "resume", "continue training from --checkpoint (heal: from the checkpoint in "
         "--heal-out)", (TRAIN, HEAL), type=None, switch=True, environments=LIVE),
    Flag("--no-save-buffer", "cli.no_save_buffer", "leave the replay buffer out of checkpoints", (TRAIN,),
         type=None, switch=True),
    Flag("--scenario-block", _R + "scenario_block", "episodes per scenario block", (TRAIN,), type=int,
         environments=LIVE),
    Flag("--redecide-every", _R + "redecide_every", "re-decide every N generated tokens (0: once per prompt)",
         (TRAIN,), type=int, environments=LIVE),
    Flag("--save-every", _R + "save_every", "checkpoint and partial report every N episodes", (TRAIN,),
         type=int, environments=LIVE),
    Flag("--ablation", _R + "ablation", "none | no_hardware | no_prompt (zero that part of the state)", (TRAIN,)),
    Flag("--gamma", _R + "dqn.gamma", "discount (0: one decision per prompt)", (TRAIN,), type=float),
    Flag("--lr", _R + "dqn.learning_rate", "Adam learning rate", (TRAIN,), type=float),
    Flag("--weight-decay", _R + "dqn.weight_decay", "L2 weight decay of the Q-network (Adam)", (TRAIN,), type=float),
    Flag("--gradient-steps", _R + "dqn.gradient_steps", "gradient steps per stored transition (default: "
         f"{OFFLINE_GRADIENT_STEPS} offline, where transitions are free)", (TRAIN,), type=int),
    Flag("--batch-size", _R + "dqn.batch_size", "replay minibatch size", (TRAIN,), type=int),
    Flag("--buffer-size", _R + "dqn.buffer_size", "replay buffer capacity", (TRAIN,), type=int),
    Flag("--learning-starts", _R + "dqn.learning_starts", "transitions before the first update", (TRAIN,), type=int),
    Flag("--epsilon-start", _R + "dqn.epsilon_start", "initial exploration rate", (TRAIN,), type=float),
    Flag("--epsilon-end", _R + "dqn.epsilon_end", "final exploration rate", (TRAIN,), type=float),
    Flag("--exploration-fraction", _R + "dqn.exploration_fraction", "share of episodes over which epsilon decays",
         (TRAIN,), type=float),
    Flag("--target-update", _R + "dqn.target_update", "soft | hard", (TRAIN,)),
    Flag("--tau", _R + "dqn.tau", "soft target update rate", (TRAIN,), type=float),
    # ---- evaluation (eval; test and baselines with --lm-eval / their WikiText slice)
    Flag("--eval-models", "cli.eval_models", "comma-separated: dense, static:TARGET:INTENSITY, static:all (every "
         "action of --targets x --intensities), policy:CHECKPOINT (default: dense)", (EVAL,)),
    Flag("--lm-eval", "cli.lm_eval", "also run lm-eval-harness zero-shot tasks", LM_EVAL_MODES, type=None, switch=True),
    Flag("--wikitext-path", "eval.wikitext_path", "local wiki.test.raw (default: the Hub when online, else "
         "$ADAPTIVE_PRUNING_DATA)", (EVAL, BASELINES, TEST)),
    Flag("--wikitext-samples", "eval.wikitext_samples", "WikiText-2 windows scored at most", (EVAL, BASELINES, TEST),
         type=int),
    Flag("--eval-seq-len", "eval.seq_len", "window length, capped at the context", (EVAL, BASELINES, TEST),
         type=int),
    Flag("--eval-stride", "eval.stride", "window stride (default: the window length)", (EVAL, BASELINES, TEST),
         type=int),
    Flag("--tasks", "eval.tasks", "lm-eval tasks (comma-separated)", LM_EVAL_MODES, type=words, requires="--lm-eval",
         aliases=("--eval-tasks",)),
    Flag("--task-data", "cli.task_data", "local data for a task (repeatable), e.g. "
         "arc_easy=../shared/data/ai2_arc/ARC-Easy-Test.jsonl", LM_EVAL_MODES, repeat=True, metavar="TASK=PATH",
         requires="--lm-eval"),
    Flag("--limit", "eval.eval_limit", "documents per lm-eval task", LM_EVAL_MODES, type=int,
         requires="--lm-eval", aliases=("--eval-limit",)),
    Flag("--num-fewshot", "eval.num_fewshot", "few-shot examples per lm-eval prompt (default: zero-shot)",
         LM_EVAL_MODES, type=int, requires="--lm-eval"),
    Flag("--batch-size", "eval.batch_size", "lm-eval batch size (requests scored per forward)", LM_EVAL_MODES,
         type=int, requires="--lm-eval"),
    # ---- baselines and export
    Flag("--baseline-methods", "baselines.methods", "structured methods: magnitude,wanda-sp,taylor,shortgpt",
         (BASELINES,), type=words),
    Flag("--budgets", "baselines.budgets", "shares of non-embedding parameters removed", (BASELINES,), type=floats),
    Flag("--unstructured", "baselines.unstructured", "quality-only references, e.g. wanda:0.5,wanda:2:4,"
         "sparsegpt:0.5 ('none' to skip)", (BASELINES,), type=words),
    Flag("--quantized-baselines", "baselines.quantized", "weight dtypes scored as baselines, dense and with every "
         "structured point: int8 | bfloat16 (comma-separated; 'none' to skip)", (BASELINES,), type=weight_dtypes),
    Flag("--policy", "cli.policy", "add a policy's point to the sweep (repeatable)", (BASELINES,), repeat=True,
         metavar="CHECKPOINT"),
    Flag("--speed-repeats", "baselines.speed_repeats", "interleaved (dense, pruned) pairs per timed point",
         (BASELINES,), type=int),
    Flag("--calibration-dataset", _R + "calibration.dataset", "text calibrating importance, compensation and the "
         "baseline methods: comma-separated sources taken in turn (builtin | alpaca | sentences | local file | HF id); "
         "never evaluation data", MODEL_MODES),
    Flag("--calibration-samples", _R + "calibration.samples", "calibration texts used at most", MODEL_MODES,
         type=int),
    # ---- nested healing (--mode heal, pruners.recovery.healing)
    Flag("--heal-out", _R + "heal.out_dir", "healed model folder (save_pretrained + elastic.pt sidecar + "
         "heal.json; the checkpoint lives there while healing); default: .cache/heal/<model>", (HEAL,), metavar="DIR"),
    Flag("--heal-dataset", _R + "heal.dataset", "prompts the dense model continues to make the distillation corpus: "
         "comma-separated builtin | alpaca | local file | HF id; never evaluation data", (HEAL,)),
    Flag("--heal-samples", _R + "heal.samples", "prompts continued by the dense model", (HEAL,), type=int),
    Flag("--heal-new-tokens", _R + "heal.new_tokens", "tokens the dense model generates per prompt", (HEAL,),
         type=int),
    Flag("--heal-steps", _R + "heal.steps", "optimizer steps", (HEAL,), type=int),
    Flag("--heal-batch", _R + "heal.batch", "sequences per step", (HEAL,), type=int),
    Flag("--heal-seq-len", _R + "heal.seq_len", "tokens per sequence (packed windows of the corpus)", (HEAL,),
         type=int),
    Flag("--heal-lr", _R + "heal.lr", "AdamW peak learning rate (10 %% warm-up, cosine decay)", (HEAL,), type=float),
    Flag("--heal-random", _R + "heal.random_actions", "random actions per step besides the full model and the "
         "smallest action (sandwich rule)", (HEAL,), type=int),
    Flag("--heal-save-every", _R + "heal.save_every", "heal checkpoint every N steps (and on interrupt)", (HEAL,),
         type=int),
    Flag("--heal-validation", _R + "heal.validation", "held-out prompts (the next ones of --heal-dataset, continued "
         "the same way, never trained on): every action's KL on them and on as many training windows, in heal.json "
         "(0: none)", (HEAL,), type=int),
    Flag("--heal-validate-every", _R + "heal.validate_every", "score the held-out KL at step 0, every N steps and "
         "at the end", (HEAL,), type=int),
    Flag("--export", "cli.export_dir", "folder for the pruned model (save_pretrained)", (EXPORT,), metavar="DIR"),
    Flag("--action", "cli.action", "TARGET:INTENSITY to export, e.g. ffn_neurons:0.5", (EXPORT,)),
    Flag("--baseline", "cli.baseline", "METHOD@BUDGET to export, e.g. taylor@0.3", (EXPORT,)),
    Flag("--gguf", "cli.gguf", "also write DIR/model.gguf for llama.cpp (architecture deci when the layers' widths "
         "differ, else llama)", (EXPORT,), type=None, switch=True),
    Flag("--overwrite", "cli.overwrite", "replace the files of a non-empty --export folder", (EXPORT,), type=None,
         switch=True),
    # ---- the OpenAI-compatible server (--mode serve, serving/)
    Flag("--host", "serve.host", "address to listen on", (SERVE,)),
    Flag("--port", "serve.port", "port to listen on", (SERVE,), type=int),
    Flag("--max-batch", "serve.max_batch", "rows decoded together (continuous batching)", (SERVE,), type=int),
    Flag("--max-queue", "serve.max_queue", "waiting requests beyond which the server answers 429 with Retry-After",
         (SERVE,), type=int),
    Flag("--serve-policy", "serve.policy", "who picks each step's action: " + " | ".join(SERVE_POLICIES) +
         " (a serving checkpoint)", (SERVE,)),
    Flag("--serve-actions", "serve.actions", "the menu of slack and learned policies (comma-separated; width "
         "actions change per step, head/layer actions per batch)", (SERVE,), type=words),
    Flag("--slo-ttft-ms", "serve.slo_ttft_ms", "SLO: first token due this long after arrival", (SERVE,), type=float),
    Flag("--slo-tpot-ms", "serve.slo_tpot_ms", "SLO: each further token due this much later", (SERVE,), type=float),
    Flag("--default-max-tokens", "serve.max_tokens", "max_tokens of a request that sets none", (SERVE,),
         type=int),
    Flag("--step-table", "serve.step_table", "measured step-time table (JSON) for slack and learned policies "
         "(default: measured at start, cached per machine)", (SERVE,)),
)

# --help groups: a section starts at its first flag in FLAGS and holds the flags after it, except the refiled ones.
SECTIONS = {"--model": "model and engine", "--seed": "data", "--environment": "environment, contention and timing",
            "--alpha": "reward", "--episodes": "training", "--eval-models": "evaluation (WikiText-2, lm-eval)",
            "--baseline-methods": "baselines", "--heal-out": "healing"}
REFILED = {"--report-dir": "outputs", "--checkpoint": "outputs", "--calibration-dataset": "model and engine",
           "--calibration-samples": "model and engine", "--export": "export", "--action": "export",
           "--baseline": "export", "--overwrite": "export"}
GROUP_ORDER = ("model and engine", "data", "outputs", "environment, contention and timing", "reward", "training",
               "evaluation (WikiText-2, lm-eval)", "baselines", "export", "healing")


def _default(dest: str) -> Any:
    root, _, path = dest.partition(".")
    obj: Any = DEFAULTS.get(root)
    if obj is None:
        return None
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _groups() -> dict[int, str]:
    groups, section = {}, ""
    for flag in FLAGS:
        section = SECTIONS.get(flag.name, section)
        groups[id(flag)] = REFILED.get(flag.name, section)
    return groups


def _by_name() -> dict[str, tuple[Flag, ...]]:
    named: dict[str, tuple[Flag, ...]] = {}
    for flag in FLAGS:
        for name in (flag.name, *flag.aliases):
            named[name] = (*named.get(name, ()), flag)
    return named


DEFAULTS = {"run": RunConfig(), "eval": EvalConfig(), "baselines": BaselineConfig(), "serve": ServeConfig()}   # read, never changed
GROUPS, BY_NAME = _groups(), _by_name()


def group_of(flag: Flag) -> str:
    return GROUPS[id(flag)]


def flag_for(name: str, mode: str | None) -> Flag:
    """The flag called ``name`` (or one of its aliases) in ``mode``: one name may act on different fields in
    different modes (--batch-size: the replay minibatch in train, lm-eval's batch elsewhere)."""
    named = BY_NAME[name]
    return next((f for f in named if mode in f.modes), named[0])


# Values shown in error messages where the config default is none or too long to help.
EXAMPLES = {"--targets": "ffn_neurons,attention_heads", "--intensities": "0.25,0.5", "--limit": "100",
            "--num-fewshot": "5", "--batch-size": "8", "--eval-models": "dense,static:ffn_neurons:0.5",
            "--action": "ffn_neurons:0.5", "--baseline": "taylor@0.3", "--export": "exports/tiny-ffn50",
            "--policy": "checkpoints/policy.pt", "--ablation-checkpoints": "checkpoints/policy.no_prompt.pt",
            "--task-data": "arc_easy=ARC-Easy-Test.jsonl", "--test-scenarios": "idle,heavy",
            "--test-dataset": "builtin", "--wikitext-path": "wiki.test.raw", "--heal-out": ".cache/heal/tiny",
            "--offline-cache": ".cache/offline", "--latency-table": "reports/train-.../latency_table.json",
            "--telemetry-trace": "reports/train-.../metrics.json", "--lr": "0.001", "--model": "tiny",
            "--device": "cpu", "--train-dataset": "builtin", "--redecide-every": "8", "--eval-stride": "512"}


def example(flag: Flag) -> str:
    if flag.name in EXAMPLES:
        return EXAMPLES[flag.name]
    default = _default(flag.dest)
    return as_flag_value(default) if default not in (None, (), "") and not flag.switch else "..."


def _typed(flag: Flag) -> Callable[[str], Any]:
    """The flag's parser with a one-line message naming the value and an example (argparse adds the flag)."""
    def parse(text: str) -> Any:
        try:
            return flag.type(text)
        except (ValueError, TypeError, OverflowError) as err:
            kind = KINDS.get(flag.type, "a valid value")
            shown = repr(text[:60] + "...") if len(text) > 60 else repr(text)
            raise argparse.ArgumentTypeError(f"{shown} is not {kind} (e.g. {flag.name} {example(flag)})") from err
    parse.__name__ = getattr(flag.type, "__name__", "value")
    return parse


class Parser(argparse.ArgumentParser):
    """Usage errors in one line naming the flag and where help is, instead of argparse's usage dump."""

    mode: str | None = None

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            near = [difflib.get_close_matches(word.split("=")[0], self.known_flags(), n=1)
                    for word in message.split()[2:]]
            hint = ", ".join(m[0] for m in near if m)
            message += f" (did you mean {hint}?)" if hint else ""
        mode = f"--mode {self.mode} " if self.mode else "--mode MODE "
        print(f"error: {' '.join(message.split())}; see {self.prog} {mode}--help", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    def known_flags(self) -> list[str]:
        return [o for action in self._actions for o in action.option_strings]


def build_parser(mode: str | None = None) -> Parser:
    """The parser of ``mode`` (None: every flag shown): its flags in argparse groups, every other flag parsed
    but hidden from --help, so that check_flags can say in which mode it acts. argparse defaults stay None,
    so a mode can tell an explicit flag from a default (and refuse it)."""
    p = Parser(prog="adaptive_pruning.py", allow_abbrev=False,
               usage=f"%(prog)s --mode {mode or 'MODE'} [flags] | --config FILE [flags]",
               description="Runtime-adaptive pruning via RL: train, test, evaluate, report and serve."
               + (f" Flags of --mode {mode}." if mode else ""),
               epilog="Each flag lists the modes where it has an effect; others refuse it. "
                      "`--mode MODE --help` lists one mode's flags.")
    p.mode = mode
    p.add_argument("--mode", required=True, choices=MODES, help="what to run")
    p.add_argument("--config", metavar="FILE", help="run.yaml | config.json: flag values (a run's own config.json "
                   "re-runs it, mode included); flags on the command line override it")
    p.add_argument("run_dirs", nargs="*", help="report mode: run folder(s); several write a comparison"
                   if mode in (None, "report") else argparse.SUPPRESS)
    groups = {name: p.add_argument_group(name) for name in GROUP_ORDER}
    seen: set[str] = set()
    for flag in sorted(FLAGS, key=lambda f: mode not in f.modes):   # the mode's own variant of a shared name first
        if flag.name in seen:
            continue
        seen.add(flag.name)
        shown = mode is None or mode in flag.modes
        default = _default(flag.dest)
        where = f"[{', '.join(flag.modes)}]"
        stated = f"; default: {as_flag_value(default)}" if default is not None and not flag.switch else ""
        aka = f" (also {', '.join(flag.aliases)})" if flag.aliases else ""
        text = f"{flag.help}{aka} {where}{stated}" if shown else argparse.SUPPRESS
        target = groups[group_of(flag)] if shown else p
        names = (flag.name, *flag.aliases)
        if flag.switch:
            target.add_argument(*names, dest=flag.attr, action="store_true", default=None, help=text)
        elif flag.repeat:
            target.add_argument(*names, dest=flag.attr, action="append", default=None, metavar=flag.metavar,
                                help=text)
        else:
            target.add_argument(*names, dest=flag.attr, type=_typed(flag) if flag.type else None, default=None,
                                metavar=flag.metavar, help=text)
    p.add_argument("--debug", action="store_true", help="verbose logging and full tracebacks [all modes]")
    return p


def overview() -> str:
    """`--help` without a mode: the modes and how to list one mode's flags (a hundred flags at once helped nobody)."""
    counts = {m: sum(m in f.modes for f in FLAGS) for m in MODES}
    rows = "\n".join(f"  --mode {m:<10} {counts[m]:3d} flags" for m in MODES)
    return ("usage: adaptive_pruning.py --mode MODE [flags] | --config FILE [flags]\n\n"
            "Runtime-adaptive pruning via RL: train, test, evaluate, report and serve.\n\nmodes:\n" + rows +
            "\n\n`adaptive_pruning.py --mode MODE --help` lists MODE's flags in groups; "
            "docs/flags.md lists every flag.\n")


def given(args: argparse.Namespace) -> list[Flag]:
    """The flags set on the command line or by --config (each name resolved for args.mode)."""
    flags = [flag_for(name, args.mode) for name in dict.fromkeys(f.name for f in FLAGS)
             if getattr(args, BY_NAME[name][0].attr, None) is not None]
    return flags


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that do nothing in args.mode (UsageError names the modes where they apply)."""
    present = {f.name for f in given(args)}
    for flag in given(args):
        value = getattr(args, flag.attr)
        items = value if isinstance(value, (list, tuple)) else [value]
        if not flag.switch and (not items or any(isinstance(v, str) and not v.strip() for v in items)):
            raise UsageError(f"argument {flag.name}: {shown_value(value)} is empty (e.g. {flag.name} {example(flag)})")
        if args.mode not in flag.modes:
            acts = [m for m in MODES if any(m in f.modes for f in FLAGS if f.name == flag.name)]
            raise UsageError(f"{flag.name} has no effect in --mode {args.mode}; it applies to --mode "
                             f"{', '.join(acts)}")
        if flag.requires and flag.requires not in present:
            raise UsageError(f"{flag.name} only matters with {flag.requires}")
    state = args.state_features or RunConfig().state_features
    if "--lookahead-tokens" in present and not uses_lookahead(state):
        raise UsageError(f"--lookahead-tokens only matters with a look-ahead state: add --state-features "
                         f"{hardware_kind(state)}+lookahead, or drop --lookahead-tokens")
    if args.mode == TRAIN or args.environment:   # test mode otherwise takes the checkpoint's (run_test checks)
        check_environment(given(args), args.environment or RunConfig().environment)
    wikitext = present & {"--wikitext-path", "--wikitext-samples", "--eval-seq-len", "--eval-stride"}
    if args.mode == TEST and wikitext and "--lm-eval" not in present:
        raise UsageError(f"{', '.join(sorted(wikitext))}: the WikiText flags only matter in --mode test with --lm-eval")
    if args.mode == EXPORT and "--baseline" in present and present & {"--importance", "--allocation", "--recovery"}:
        raise UsageError("--importance/--allocation/--recovery only matter in --mode export with --action (a "
                         "--baseline export prunes by the method's own criterion, uniformly, uncompensated)")
    if "--structural" in present and "--mask" in present:
        raise UsageError("--structural and --mask exclude each other")
    if args.run_dirs and args.mode != "report":
        raise UsageError(f"unexpected argument(s) {' '.join(args.run_dirs)}: run folders are only read by --mode report")


def check_environment(flags: list[Flag], environment: str) -> None:
    """Refuse flags that do nothing with this --environment (UsageError names the one where they apply);
    an unknown environment is left to modes.validate, which names the choices."""
    if environment not in ENVIRONMENTS:
        return
    for flag in flags:
        if environment not in flag.environments:
            raise UsageError(f"{flag.name} has no effect with --environment {environment}; it applies with "
                             f"--environment {', '.join(flag.environments)}")


def flags_of(explicit: set[str]) -> list[Flag]:
    """The run flags behind a set of explicit RunConfig paths (run_config's second value)."""
    return [f for f in FLAGS if f.dest.startswith(_R) and f.dest.removeprefix(_R) in explicit]


def _replace_path(obj: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace_path(getattr(obj, path[0]), path[1:], value)})


def _filled(root: str, base: Any, args: argparse.Namespace) -> Any:
    for flag in given(args):
        head, _, path = flag.dest.partition(".")
        if head == root:
            value = getattr(args, flag.attr)
            base = _replace_path(base, path.split("."), None if value == OFF else value)
    return base


def run_config(args: argparse.Namespace) -> tuple[RunConfig, set[str]]:
    """RunConfig from defaults + flags; also the config paths the user set explicitly (test mode keeps
    the checkpoint's settings for everything else)."""
    cfg = _filled("run", RunConfig(mode=args.mode), args)
    explicit = {f.dest.removeprefix(_R) for f in given(args) if f.dest.startswith(_R)}
    if args.mask or args.structural:
        explicit.add("structural")
        structural = bool(args.structural)
    else:
        structural = structural_default()
    dqn = dataclasses.replace(cfg.dqn, seed=cfg.seed)
    if cfg.environment == "offline" and args.gradient_steps is None:
        dqn = dataclasses.replace(dqn, gradient_steps=OFFLINE_GRADIENT_STEPS)
    cfg = dataclasses.replace(cfg, structural=structural, save_buffer=not args.no_save_buffer, dqn=dqn)
    return cfg, explicit


def flag_names(mode: str) -> dict[str, str]:
    """Config path ("run.dqn.learning_rate") -> the flag that sets it in ``mode`` ("--lr")."""
    names = dict.fromkeys(f.name for f in FLAGS)
    return {flag.dest: flag.name for flag in (flag_for(name, mode) for name in names)}


def check_values(args: argparse.Namespace) -> None:
    """Every config the flags (and --config) fill is inside its declared limits (common.config LIMITS),
    before anything loads; fields that no flag sets are named by their --config key."""
    names = flag_names(args.mode)
    for root, cfg in (("run", run_config(args)[0]), ("eval", _filled("eval", EvalConfig(), args)),
                      ("baselines", _filled("baselines", BaselineConfig(), args)),
                      ("serve", _filled("serve", ServeConfig(), args))):
        check_config(cfg, lambda path, root=root: names.get(f"{root}.{path}", f"--config key {path}"))


# ---- --config FILE: a run.yaml of flag names, or a run's own config.json ----------------------------------
CONFIG_ONLY = {"mode", "structural", "save_buffer", "eval", "baselines"}   # keys that are not flags


def read_config_file(path: str) -> dict:
    """The mapping a --config file holds (JSON by its .json suffix, else YAML)."""
    file = Path(path)
    hint = "(e.g. --config reports/train-.../config.json)"
    if not file.is_file():
        raise UsageError(f"argument --config: {path!r} is not a file {hint}")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json":
            data = json.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            raise UsageError(f"argument --config: {path!r} is neither .json nor .yaml/.yml {hint}")
    except (UnicodeDecodeError, ValueError) as err:   # JSONDecodeError is a ValueError
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"argument --config: {path!r} is not valid {file.suffix.lstrip('.')} "
                         f"({' '.join(str(err).split())[:120]}) {hint}") from err
    except OSError as err:
        raise UsageError(f"argument --config: {path!r} cannot be read ({err.strerror}) {hint}") from err
    except Exception as err:   # yaml.YAMLError: yaml is imported only here
        raise UsageError(f"argument --config: {path!r} is not valid YAML ({' '.join(str(err).split())[:120]}) "
                         f"{hint}") from err
    if not isinstance(data, dict):
        raise UsageError(f"argument --config: {path!r} holds no mapping of flag names to values {hint}")
    return data


def _section(data: dict, root: str, mode: str) -> dict | None:
    """Where a config.json keeps the values of one config root (a baselines run nests its evaluation)."""
    if root == "run":
        return data
    if root == "eval" and mode == BASELINES:
        return (data.get("baselines") or {}).get("eval")
    return data.get(root)


def _file_value(data: dict, flag: Flag, mode: str) -> tuple[bool, Any]:
    """(found, value) for one flag: a key named like the flag (run.yaml), else its config path (config.json)."""
    for name in (flag.name, *flag.aliases):
        for key in (name.lstrip("-"), name.lstrip("-").replace("-", "_")):
            if key in data:
                return True, data[key]
    root, _, path = flag.dest.partition(".")
    node: Any = _section(data, root, mode) if root != "cli" else None
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _parsed(flag: Flag, value: Any, source: str) -> Any:
    """A file value as the flag's parser would give it (lists are tuples; text goes through the parser)."""
    if flag.switch:
        return True if value is True else None
    if value is None:
        return OFF if flag.type is latency_budget else None
    if flag.repeat:
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list) and flag.type in (words, floats):
        value = ",".join(map(str, value))
    if isinstance(value, str) and flag.type is not None:
        try:
            return _typed(flag)(value)
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"argument {flag.name} (from --config {source}): {err}") from err
    return value


def apply_config(args: argparse.Namespace, data: dict, source: str) -> None:
    """Fill every flag the command line left unset from a --config file; the command line wins.

    A run's config.json records every field: values equal to the default are left unset (so test mode still
    takes the checkpoint's), and fields that do nothing in this mode are skipped (logged), as are ones no
    flag sets. A key that is neither a flag nor a config field is refused.
    """
    known = CONFIG_ONLY | {f.name for f in dataclasses.fields(RunConfig)} | {
        key for f in FLAGS for n in (f.name, *f.aliases) for key in (n.lstrip("-"), n.lstrip("-").replace("-", "_"))}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise UsageError(f"argument --config: {source!r} has unknown key {unknown[0]!r} (keys are flag names, e.g. "
                         "episodes: 500, or the fields of a run's config.json)")
    ignored = []
    for name in dict.fromkeys(f.name for f in FLAGS):
        flag = flag_for(name, args.mode)
        found, raw = _file_value(data, flag, args.mode)
        if not found or getattr(args, flag.attr) is not None:
            continue
        value = _parsed(flag, raw, source)
        default = _default(flag.dest)
        if value is None or value == default or (value == OFF and default is None):
            continue
        if args.mode not in flag.modes:
            ignored.append(flag.name)
            continue
        setattr(args, flag.attr, value)
    lm_tasks = (_section(data, "eval", args.mode) or {}).get("tasks")
    if lm_tasks and args.mode in LM_EVAL_MODES and args.lm_eval is None:     # a run that ran lm-eval
        args.lm_eval = True
    if data.get("structural") is False and args.mode in (TRAIN, TEST, EVAL) and not (args.mask or args.structural):
        args.mask = True
    if data.get("save_buffer") is False and args.mode == TRAIN and args.no_save_buffer is None:
        args.no_save_buffer = True
    if ignored:
        log.info("--config %s: %s do nothing in --mode %s (ignored)", source, ", ".join(ignored), args.mode)
    unset = [path for path, value in _leaves(data, DEFAULTS["run"].to_dict()) if path not in SET_BY_FLAGS]
    if unset:
        log.warning("--config %s: %s differ from the defaults but no flag sets them: not applied", source,
                    ", ".join(unset))


# Config fields a run's config.json records that are not flag values: derived from flags (dqn.seed from --seed,
# dqn.gradient_steps per environment) or set by switches (structural, save_buffer), or the mode itself.
DERIVED = {"mode", "structural", "save_buffer", "dqn.seed", "dqn.gradient_steps"}
SET_BY_FLAGS = DERIVED | {f.dest.removeprefix(_R) for f in FLAGS if f.dest.startswith(_R)}


def _leaves(data: dict, default: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(path, value) of the RunConfig fields in ``data`` that differ from ``default``."""
    found = []
    for key, value in data.items():
        if key not in default:
            continue
        if isinstance(default[key], dict) and isinstance(value, dict):
            found += _leaves(value, default[key], f"{prefix}{key}.")
        elif (list(value) if isinstance(value, (list, tuple)) else value) != \
                (list(default[key]) if isinstance(default[key], tuple) else default[key]):
            found.append((prefix + key, value))
    return found


def structural_default() -> bool:
    """STRUCTURAL_PRUNING from .env or the environment: 1 (slice, the default) or 0 (masks); anything else is
    refused rather than read as one of them."""
    value = os.environ.get("STRUCTURAL_PRUNING", "1").strip().lower()
    if value not in ("0", "1", "false", "true", ""):
        raise UsageError(f"STRUCTURAL_PRUNING={value[:40]!r} (in .env or the environment) is neither 1 nor 0: "
                         "set STRUCTURAL_PRUNING=1 (slice weights) or 0 (masks), or pass --structural / --mask")
    return value in ("1", "true", "")


def task_data(items: list[str] | None) -> dict[str, str]:
    """TASK=PATH pairs of --task-data."""
    from evaluation.lm_eval_tasks import parse_task_data
    from modes.validate import naming
    with naming("--task-data"):
        return parse_task_data(items or [])


def eval_config(args: argparse.Namespace, base: EvalConfig | None = None) -> EvalConfig:
    """The evaluation flags over ``base``; lm-eval tasks only with --lm-eval (then default: DEFAULT_TASKS)."""
    cfg = _filled("eval", base or EvalConfig(), args)
    tasks = tuple(args.tasks or DEFAULT_TASKS) if args.lm_eval else ()
    return dataclasses.replace(cfg, tasks=tasks, task_data=task_data(args.task_data))


def baseline_config(args: argparse.Namespace) -> BaselineConfig:
    cfg = _filled("baselines", BaselineConfig(), args)
    evaluation = eval_config(args, base=cfg.eval)
    unstructured = () if cfg.unstructured == ("none",) else cfg.unstructured
    return dataclasses.replace(cfg, unstructured=unstructured, policies=tuple(args.policy or ()), eval=evaluation,
                               calibration=calibration_config(args))


def serve_config(args: argparse.Namespace) -> ServeConfig:
    return _filled("serve", ServeConfig(), args)


def calibration_config(args: argparse.Namespace) -> CalibrationConfig:
    """The run's calibration (the baselines sweep calibrates its methods on the same text)."""
    return _filled("run", RunConfig(), args).calibration


def flag_reference() -> str:
    """docs/flags.md, generated from the table (``python -m modes.flags > docs/flags.md``; a test keeps it current)."""
    lines = ["# Flags of adaptive_pruning.py", "",
             "Generated from the flag table in `modes/flags.py` (`python -m modes.flags > docs/flags.md`); a test "
             "fails when it is stale.", "",
             "- Every flag names the modes where it acts; any other mode refuses it with one `error:` line (exit 2). "
             "`adaptive_pruning.py --mode MODE --help` lists one mode's flags, in these groups.",
             "- Values are checked before anything loads, against the limits declared beside each config field "
             "(`common/config.py`, `LIMITS`): numbers must be finite and in range, lists and names non-empty. "
             "The error names the flag, the value and an accepted example.",
             "- Everything a run writes is checked first: `--checkpoint` (a file that can be written), "
             "`--report-dir` (writable, not the repository root), `--export` (new or empty, or `--overwrite`).",
             "- `--config FILE` reads flag values from a YAML file (`episodes: 500`, `lr: 0.001`, keys spelled like "
             "the flags) or from a run's own `config.json` (in its report folder), which re-runs that run, mode "
             "included. Flags on the command line override the file. Values equal to the default, and fields that "
             "do nothing in the mode, are skipped.",
             "- lm-eval conventions: `--tasks`, `--limit`, `--num-fewshot`, `--batch-size` (with `--lm-eval`); "
             "`--eval-tasks` and `--eval-limit` are still accepted. In `--mode train`, `--batch-size` is the DQN's "
             "replay minibatch.",
             "- Interrupts (Ctrl-C, SIGTERM): live training saves its checkpoint (from the first episode on) and a "
             "partial report, prints `saved: checkpoint ...`, and `--resume` continues it; an interrupt before "
             "training starts says that nothing was saved. Temp files left by a killed run (SIGKILL) are removed "
             "at the next start.", ""]
    for group in GROUP_ORDER:
        lines += [f"## {group}", "", "| flag | modes | default | what it does |", "|---|---|---|---|"]
        for flag in (f for f in FLAGS if group_of(f) == group):
            default = _default(flag.dest)
            shown = "" if default is None or flag.switch else f"`{as_flag_value(default)}`"
            notes = [f"{flag.environments[0]} environment only"] if len(flag.environments) == 1 else []
            notes += [f"needs {flag.requires}"] if flag.requires else []
            notes += [f"also {', '.join(f'`{a}`' for a in flag.aliases)}"] if flag.aliases else []
            extra = f" ({'; '.join(notes)})" if notes else ""
            text = flag.help.replace("%%", "%").replace("|", "\\|")
            lines.append(f"| `{flag.name}` | {', '.join(flag.modes)} | {shown} | {text}{extra} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(flag_reference(), end="")
