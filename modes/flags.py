"""Every CLI flag: its config field, type, help, and the modes in which it does something.

Why a table: one parser serves six modes, and a flag that is accepted but ignored misleads a
researcher. Each flag names the modes where it has an effect; any other mode refuses it with one
``error:`` line (exit 2). Defaults are read from the config dataclasses (common.config), so
``--help`` and the code cannot disagree, and this module imports no torch (``--help`` is instant).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

from common.config import (DEFAULT_TASKS, ENVIRONMENTS, OFFLINE_GRADIENT_STEPS, SERVE_POLICIES, BaselineConfig,
                           CalibrationConfig, EvalConfig, RunConfig, ServeConfig)

MODES = ("train", "test", "eval", "report", "baselines", "export", "heal", "serve")
TRAIN, TEST, EVAL, BASELINES, EXPORT, HEAL = "train", "test", "eval", "baselines", "export", "heal"
SERVE = "serve"
MODEL_MODES = (TRAIN, TEST, EVAL, BASELINES, EXPORT, HEAL, SERVE)
LIVE, OFFLINE = ("live",), ("offline",)
LM_EVAL_MODES = (TEST, EVAL, BASELINES)
ENGINE_MODES = (TRAIN, TEST, EVAL, EXPORT, HEAL, SERVE)   # build the run's own PruningEngine (baselines: each method's)
EXIT_USAGE = 2


class UsageError(ValueError):
    """A flag or value that cannot work in the chosen mode (the CLI prints it as one line, exit 2)."""


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from err


def words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def latency_budget(text: str) -> float | None:
    if text.lower() in ("none", "off", "0"):
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("latency budget must be > 0 (a multiple of the idle dense latency) or 'none'")
    return value


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

    @property
    def attr(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


_R = "run."
FLAGS: tuple[Flag, ...] = (
    # ---- model and engine (every mode that loads a model)
    Flag("--model", _R + "model", "auto | smollm2-135m | tiny | llama-3.2-1b-shape | HF id | local dir", MODEL_MODES),
    Flag("--device", _R + "device", "auto | cpu | cuda | cuda:N", MODEL_MODES),
    Flag("--importance", _R + "importance", "unit ordering: fluctuation (FLAP) | activation | magnitude | "
         "block_influence | taylor (heal: the order healing starts from, stored in the folder)",
         ENGINE_MODES),
    Flag("--targets", _R + "targets", "pruning targets in the action space (comma-separated; heal: the "
         "sub-networks trained)", (TRAIN, TEST, EVAL, HEAL), type=words),
    Flag("--intensities", _R + "intensities", "intensities per target (comma-separated fractions)",
         (TRAIN, TEST, EVAL, HEAL), type=floats),
    Flag("--structural", "cli.structural", "slice weights: real speedups (default unless STRUCTURAL_PRUNING=0 "
         "in .env)", (TRAIN, TEST, EVAL), type=None, switch=True),
    Flag("--mask", "cli.mask", "zero units with hooks: quality only, NO speedup", (TRAIN, TEST, EVAL),
         type=None, switch=True),
    Flag("--allocation", _R + "allocation", "units removed per layer: global (one ranking across layers) | uniform "
         "(the same share from every layer)", ENGINE_MODES),
    Flag("--recovery", _R + "recovery", "compensate (FLAP bias for heads/FFN, least-squares linear replacement of "
         "dropped layers; training-free) | none", ENGINE_MODES),
    Flag("--long-prompt-tokens", _R + "env.long_prompt_tokens", "prompts this long are 'long' (KV pruning applies)",
         (TRAIN, TEST, EVAL), type=positive_int),
    Flag("--report-dir", _R + "report_dir", "folder for report folders", (TRAIN, TEST, EVAL, BASELINES)),
    # ---- data
    Flag("--seed", _R + "seed", "seed for data order, exploration, network init (heal: corpus sampling, "
         "batches, sandwich members)", (TRAIN, TEST, HEAL), type=int),
    Flag("--checkpoint", _R + "checkpoint", "policy checkpoint to write (train) or read (test)", (TRAIN, TEST)),
    Flag("--train-dataset", _R + "train_dataset", "builtin | local .jsonl/.json/.csv (Dolly or Alpaca schema) | HF id "
         "(test: the held-out split of it)", (TRAIN, TEST)),
    Flag("--train-samples", _R + "train_samples", "training prompts used at most", (TRAIN,), type=positive_int),
    Flag("--test-fraction", _R + "test_fraction", "share of the data set held out for testing", (TRAIN, TEST),
         type=float),
    Flag("--test-dataset", _R + "test_dataset", "test prompts (default: held-out split of the training data set)",
         (TEST,)),
    Flag("--test-samples", _R + "test_samples", "held-out prompts evaluated in test mode", (TEST,), type=positive_int),
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
         "steal, observed slowdown of the model's own decode steps)", (TRAIN,)),
    Flag("--calibrations", _R + "offline.calibrations", "latency tables per load level for training (as many "
         "again for testing)", (TRAIN, TEST), type=positive_int, environments=OFFLINE),
    Flag("--train-seeds", _R + "offline.seeds", "policies trained with seeds --seed, --seed+1, ... (their "
         "spread enters the test's intervals)", (TRAIN,), type=positive_int, environments=OFFLINE),
    Flag("--prompt-kl-tokens", _R + "offline.prompt_kl_tokens", "KL(dense||pruned) on the prompt's last N "
         "positions", (TRAIN, TEST), type=positive_int, environments=OFFLINE),
    Flag("--telemetry-draws", _R + "offline.telemetry_draws", "telemetry readings per (prompt, calibration) "
         "when fitting baselines and testing", (TRAIN, TEST), type=positive_int, environments=OFFLINE),
    Flag("--offline-cache", _R + "offline.cache_dir", "folder of the outcome and calibration cache "
         "(default: .cache/offline)", (TRAIN, TEST), environments=OFFLINE),
    Flag("--min-reference-tokens", _R + "env.min_reference_tokens", "a data set answer shorter than this is "
         "replaced by the dense greedy continuation", (TRAIN, TEST), type=positive_int),
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
         (TRAIN, TEST), type=positive_int),
    Flag("--timing", _R + "env.timing", "table (calibrated interleaved latency table) | interleaved (A B A B per "
         "episode)", (TRAIN, TEST), environments=LIVE),
    Flag("--load-timing", _R + "env.load_timing", "loaded scenarios' latency table: scaled (idle table x the dense "
         "slowdown measured under the load) | measured (interleaved pairs per action under the load; offline "
         "always measures)", (TRAIN, TEST), environments=LIVE),
    Flag("--calibration-tokens", _R + "env.calibration_tokens", "new tokens per latency-table timing",
         (TRAIN, TEST), type=positive_int),
    Flag("--calibration-repeats", _R + "env.calibration_repeats", "interleaved pairs per latency-table entry",
         (TRAIN, TEST), type=positive_int),
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
    Flag("--scenario-block", _R + "scenario_block", "episodes per scenario block", (TRAIN,), type=positive_int,
         environments=LIVE),
    Flag("--redecide-every", _R + "redecide_every", "re-decide every N generated tokens (0: once per prompt)",
         (TRAIN,), type=int, environments=LIVE),
    Flag("--save-every", _R + "save_every", "checkpoint and partial report every N episodes", (TRAIN,),
         type=positive_int, environments=LIVE),
    Flag("--ablation", _R + "ablation", "none | no_hardware | no_prompt (zero that part of the state)", (TRAIN,)),
    Flag("--gamma", _R + "dqn.gamma", "discount (0: one decision per prompt)", (TRAIN,), type=float),
    Flag("--lr", _R + "dqn.learning_rate", "Adam learning rate", (TRAIN,), type=float),
    Flag("--weight-decay", _R + "dqn.weight_decay", "L2 weight decay of the Q-network (Adam)", (TRAIN,), type=float),
    Flag("--gradient-steps", _R + "dqn.gradient_steps", "gradient steps per stored transition (default: "
         f"{OFFLINE_GRADIENT_STEPS} offline, where transitions are free)", (TRAIN,), type=positive_int),
    Flag("--batch-size", _R + "dqn.batch_size", "replay minibatch size", (TRAIN,), type=positive_int),
    Flag("--buffer-size", _R + "dqn.buffer_size", "replay buffer capacity", (TRAIN,), type=positive_int),
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
         type=positive_int),
    Flag("--eval-seq-len", "eval.seq_len", "window length, capped at the context", (EVAL, BASELINES, TEST),
         type=positive_int),
    Flag("--eval-stride", "eval.stride", "window stride (default: the window length)", (EVAL, BASELINES, TEST),
         type=positive_int),
    Flag("--eval-tasks", "eval.tasks", "lm-eval tasks", LM_EVAL_MODES, type=words, requires="--lm-eval"),
    Flag("--task-data", "cli.task_data", "local data for a task (repeatable), e.g. "
         "arc_easy=../shared/data/ai2_arc/ARC-Easy-Test.jsonl", LM_EVAL_MODES, repeat=True, metavar="TASK=PATH",
         requires="--lm-eval"),
    Flag("--eval-limit", "eval.eval_limit", "documents per lm-eval task", LM_EVAL_MODES, type=positive_int,
         requires="--lm-eval"),
    # ---- baselines and export
    Flag("--baseline-methods", "baselines.methods", "structured methods: magnitude,wanda-sp,taylor,shortgpt",
         (BASELINES,), type=words),
    Flag("--budgets", "baselines.budgets", "shares of non-embedding parameters removed", (BASELINES,), type=floats),
    Flag("--unstructured", "baselines.unstructured", "quality-only references, e.g. wanda:0.5,wanda:2:4,"
         "sparsegpt:0.5 ('none' to skip)", (BASELINES,), type=words),
    Flag("--policy", "cli.policy", "add a policy's point to the sweep (repeatable)", (BASELINES,), repeat=True,
         metavar="CHECKPOINT"),
    Flag("--speed-repeats", "baselines.speed_repeats", "interleaved (dense, pruned) pairs per timed point",
         (BASELINES,), type=positive_int),
    Flag("--calibration-dataset", _R + "calibration.dataset", "text calibrating importance, compensation and the "
         "baseline methods: comma-separated sources taken in turn (builtin | alpaca | sentences | local file | HF id); "
         "never evaluation data", MODEL_MODES),
    Flag("--calibration-samples", _R + "calibration.samples", "calibration texts used at most", MODEL_MODES,
         type=positive_int),
    # ---- nested healing (--mode heal, pruners.healing)
    Flag("--heal-out", _R + "heal.out_dir", "healed model folder (save_pretrained + elastic.pt sidecar + "
         "heal.json; the checkpoint lives there while healing); default: .cache/heal/<model>", (HEAL,), metavar="DIR"),
    Flag("--heal-dataset", _R + "heal.dataset", "prompts the dense model continues to make the distillation corpus: "
         "comma-separated builtin | alpaca | local file | HF id; never evaluation data", (HEAL,)),
    Flag("--heal-samples", _R + "heal.samples", "prompts continued by the dense model", (HEAL,), type=positive_int),
    Flag("--heal-new-tokens", _R + "heal.new_tokens", "tokens the dense model generates per prompt", (HEAL,),
         type=positive_int),
    Flag("--heal-steps", _R + "heal.steps", "optimizer steps", (HEAL,), type=positive_int),
    Flag("--heal-batch", _R + "heal.batch", "sequences per step", (HEAL,), type=positive_int),
    Flag("--heal-seq-len", _R + "heal.seq_len", "tokens per sequence (packed windows of the corpus)", (HEAL,),
         type=positive_int),
    Flag("--heal-lr", _R + "heal.lr", "AdamW peak learning rate (10 %% warm-up, cosine decay)", (HEAL,), type=float),
    Flag("--heal-random", _R + "heal.random_actions", "random actions per step besides the full model and the "
         "smallest action (sandwich rule)", (HEAL,), type=int),
    Flag("--heal-save-every", _R + "heal.save_every", "heal checkpoint every N steps (and on interrupt)", (HEAL,),
         type=positive_int),
    Flag("--heal-validation", _R + "heal.validation", "held-out prompts (the next ones of --heal-dataset, continued "
         "the same way, never trained on): every action's KL on them and on as many training windows, in heal.json "
         "(0: none)", (HEAL,), type=non_negative_int),
    Flag("--heal-validate-every", _R + "heal.validate_every", "score the held-out KL at step 0, every N steps and "
         "at the end", (HEAL,), type=positive_int),
    Flag("--export", "cli.export_dir", "folder for the pruned model (save_pretrained)", (EXPORT,), metavar="DIR"),
    Flag("--action", "cli.action", "TARGET:INTENSITY to export, e.g. ffn_neurons:0.5", (EXPORT,)),
    Flag("--baseline", "cli.baseline", "METHOD@BUDGET to export, e.g. taylor@0.3", (EXPORT,)),
    # ---- the OpenAI-compatible server (--mode serve, serving/)
    Flag("--host", "serve.host", "address to listen on", (SERVE,)),
    Flag("--port", "serve.port", "port to listen on", (SERVE,), type=positive_int),
    Flag("--max-batch", "serve.max_batch", "rows decoded together (continuous batching)", (SERVE,), type=positive_int),
    Flag("--max-queue", "serve.max_queue", "waiting requests beyond which the server answers 429 with Retry-After",
         (SERVE,), type=positive_int),
    Flag("--serve-policy", "serve.policy", "who picks each step's action: " + " | ".join(SERVE_POLICIES) +
         " (a serving checkpoint)", (SERVE,)),
    Flag("--serve-actions", "serve.actions", "the menu of slack and learned policies (comma-separated; width "
         "actions change per step, head/layer actions per batch)", (SERVE,), type=words),
    Flag("--slo-ttft-ms", "serve.slo_ttft_ms", "SLO: first token due this long after arrival", (SERVE,), type=float),
    Flag("--slo-tpot-ms", "serve.slo_tpot_ms", "SLO: each further token due this much later", (SERVE,), type=float),
    Flag("--default-max-tokens", "serve.max_tokens", "max_tokens of a request that sets none", (SERVE,),
         type=positive_int),
    Flag("--step-table", "serve.step_table", "measured step-time table (JSON) for slack and learned policies "
         "(default: measured at start, cached per machine)", (SERVE,)),
)


def _default(dest: str) -> Any:
    root, _, path = dest.partition(".")
    obj: Any = {"run": RunConfig(), "eval": EvalConfig(), "baselines": BaselineConfig(), "serve": ServeConfig()}.get(root)
    if obj is None:
        return None
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def build_parser() -> argparse.ArgumentParser:
    """argparse defaults stay None, so a mode can tell an explicit flag from a default (and refuse it)."""
    p = argparse.ArgumentParser(prog="adaptive_pruning.py",
                                description="Runtime-adaptive pruning via RL: train, test, evaluate, report and serve.",
                                epilog="Each flag lists the modes where it has an effect; others refuse it.")
    p.add_argument("--mode", required=True, choices=MODES, help="what to run")
    p.add_argument("run_dirs", nargs="*", help="report mode: run folder(s); several write a comparison")
    for flag in FLAGS:
        default = _default(flag.dest)
        where = f"[{', '.join(flag.modes)}]"
        shown = f"; default: {','.join(map(str, default)) if isinstance(default, tuple) else default}" \
            if default is not None and not flag.switch else ""
        text = f"{flag.help} {where}{shown}"
        if flag.switch:
            p.add_argument(flag.name, action="store_true", default=None, help=text)
        elif flag.repeat:
            p.add_argument(flag.name, action="append", default=None, metavar=flag.metavar, help=text)
        else:
            p.add_argument(flag.name, type=flag.type, default=None, metavar=flag.metavar, help=text)
    p.add_argument("--debug", action="store_true", help="verbose logging and full tracebacks [all modes]")
    return p


def given(args: argparse.Namespace) -> list[Flag]:
    return [f for f in FLAGS if getattr(args, f.attr) is not None]


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that do nothing in args.mode (UsageError names the modes where they apply)."""
    present = {f.name for f in given(args)}
    for flag in given(args):
        if args.mode not in flag.modes:
            raise UsageError(f"{flag.name} has no effect in --mode {args.mode}; it applies to --mode "
                             f"{', '.join(flag.modes)}")
        if flag.requires and flag.requires not in present:
            raise UsageError(f"{flag.name} only matters with {flag.requires}")
    if args.mode == TRAIN or args.environment:   # test mode otherwise takes the checkpoint's (run_test checks)
        check_environment(given(args), args.environment or RunConfig().environment)
    if args.mode == TEST and present & {"--wikitext-path", "--wikitext-samples", "--eval-seq-len", "--eval-stride"} \
            and "--lm-eval" not in present:
        raise UsageError("the WikiText flags only matter in --mode test with --lm-eval")
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
            base = _replace_path(base, path.split("."), getattr(args, flag.attr))
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
        structural = os.environ.get("STRUCTURAL_PRUNING", "1").strip() not in ("0", "false", "False")
    dqn = dataclasses.replace(cfg.dqn, seed=cfg.seed)
    if cfg.environment == "offline" and args.gradient_steps is None:
        dqn = dataclasses.replace(dqn, gradient_steps=OFFLINE_GRADIENT_STEPS)
    cfg = dataclasses.replace(cfg, structural=structural, save_buffer=not args.no_save_buffer, dqn=dqn)
    return cfg, explicit


def task_data(items: list[str] | None) -> dict[str, str]:
    """TASK=PATH pairs of --task-data."""
    from evaluation.lm_eval_tasks import parse_task_data
    return parse_task_data(items or [])


def eval_config(args: argparse.Namespace, base: EvalConfig | None = None) -> EvalConfig:
    """The evaluation flags over ``base``; lm-eval tasks only with --lm-eval (then default: DEFAULT_TASKS)."""
    cfg = _filled("eval", base or EvalConfig(), args)
    tasks = tuple(args.eval_tasks or DEFAULT_TASKS) if args.lm_eval else ()
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


def flag_matrix() -> str:
    """The README's flag x mode table (regenerate with ``python -m modes.flags`` after adding a flag)."""
    shown = [m for m in MODES if m != "report"]
    lines = ["| flag | " + " | ".join(shown) + " | default |", "|---|" + "---|" * len(shown) + "---|"]
    for flag in FLAGS:
        default = _default(flag.dest)
        text = ",".join(map(str, default)) if isinstance(default, tuple) else default
        cells = " | ".join("✓" if m in flag.modes else "" for m in shown)
        only = f" ({flag.environments[0]} only)" if len(flag.environments) == 1 else ""
        lines.append(f"| `{flag.name}`{only} | {cells} | {'' if default is None or flag.switch else f'`{text}`'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(flag_matrix())
