#!/usr/bin/env python
"""Runtime-adaptive pruning via RL: train, test, evaluate and report (see README.md).

Thin CLI: parses arguments into a RunConfig and calls modes.py. Bad input ends in one line
naming the fix and exit code 2 (a traceback only with --debug).
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: under contention (the load scenarios) a spinning OpenMP thread
# that loses its core stalls every op; passive waiting keeps a loaded machine usable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import offline  # noqa: E402,F401  (must precede transformers/datasets/lm_eval imports)

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from common.config import RunConfig

MODES = ("train", "test", "eval", "report", "baselines", "export")
EXIT_USAGE = 2


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from err


def _words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _budget(text: str) -> float | None:
    if text.lower() in ("none", "off", "0"):
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("latency budget must be > 0 (a multiple of the idle dense latency) or 'none'")
    return value


# (flag, RunConfig path, type, help). Defaults come from the dataclasses, so --help and code agree;
# argparse defaults stay None so test mode can tell explicit flags from checkpoint settings.
RUN_FLAGS = [
    ("--model", "model", str, "auto | smollm2-135m | tiny | llama-3.2-1b-shape | HF id | local dir"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--seed", "seed", int, "seed for data order, exploration, network init"),
    ("--episodes", "episodes", int, "training episodes (one prompt each)"),
    ("--checkpoint", "checkpoint", str, "policy checkpoint to write (train) or read (test, eval)"),
    ("--train-dataset", "train_dataset", str, "builtin | local .jsonl/.json/.csv (Dolly or Alpaca schema) | HF id"),
    ("--train-samples", "train_samples", _positive_int, "training prompts used at most"),
    ("--test-dataset", "test_dataset", str, "test prompts (default: held-out split of the training data set)"),
    ("--test-samples", "test_samples", _positive_int, "held-out prompts evaluated in test mode"),
    ("--test-fraction", "test_fraction", float, "share of the data set held out for testing"),
    ("--importance", "importance", str, "unit ordering: magnitude | activation | block_influence"),
    ("--targets", "targets", _words, "pruning targets in the action space (comma-separated)"),
    ("--intensities", "intensities", _floats, "intensities per target (comma-separated fractions)"),
    ("--scenarios", "scenarios", str, "contention scenarios: idle,light,loaded,memory (comma-separated)"),
    ("--scenario-block", "scenario_block", _positive_int, "episodes per scenario block"),
    ("--redecide-every", "redecide_every", int, "re-decide every N generated tokens (0: once per prompt)"),
    ("--save-every", "save_every", _positive_int, "checkpoint and partial report every N episodes"),
    ("--latency-table", "latency_table", str, "reuse a latency_table.json from an earlier run (reproducibility)"),
    ("--telemetry-trace", "telemetry_trace", str, "replay hardware states from an earlier train run's metrics.json"),
    ("--ablation", "ablation", str, "none | no_hardware | no_prompt (zero that part of the state)"),
    ("--nlp-backend", "nlp_backend", str, "prompt analysis: auto (first of spaCy, NLTK, regex within the budget) | spacy | nltk | regex"),
    ("--observation-budget-ms", "observation_budget_ms", float, "auto's per-prompt analysis budget in ms (<= 0: no timing)"),
    ("--report-dir", "report_dir", str, "folder for report folders"),
    ("--telemetry-hz", "telemetry_hz", float, "background telemetry sampling rate"),
    ("--max-new-tokens", "env.max_new_tokens", _positive_int, "tokens generated per prompt (EOS ignored while timing)"),
    ("--timing", "env.timing", str, "table (calibrated interleaved latency table) | interleaved (A B A B per episode)"),
    ("--load-timing", "env.load_timing", str, "loaded scenarios' latency table: scaled (idle table x the dense "
     "slowdown measured under the load) | measured (interleaved pairs per action under the load)"),
    ("--calibration-tokens", "env.calibration_tokens", _positive_int, "new tokens per calibration timing"),
    ("--calibration-repeats", "env.calibration_repeats", _positive_int, "interleaved pairs per latency-table entry"),
    ("--long-prompt-tokens", "env.long_prompt_tokens", _positive_int, "prompts this long are 'long' (KV pruning applies)"),
    ("--alpha", "reward.alpha", float, "reward weight on log speedup"),
    ("--beta", "reward.beta", float, "reward weight on log PPL ratio"),
    ("--kl-weight", "reward.kl_weight", float, "reward weight on token KL(dense||pruned)"),
    ("--energy-weight", "reward.energy_weight", float, "reward weight on log energy ratio (where measurable)"),
    ("--latency-budget", "reward.latency_budget", _budget, "budget as a multiple of idle dense latency, or 'none'"),
    ("--budget-weight", "reward.budget_weight", float, "penalty per unit of relative budget overrun"),
    ("--gamma", "dqn.gamma", float, "discount (0: one decision per prompt)"),
    ("--lr", "dqn.learning_rate", float, "Adam learning rate"),
    ("--weight-decay", "dqn.weight_decay", float, "L2 weight decay of the Q-network (Adam)"),
    ("--gradient-steps", "dqn.gradient_steps", _positive_int, "gradient steps per stored transition"),
    ("--batch-size", "dqn.batch_size", _positive_int, "replay minibatch size"),
    ("--buffer-size", "dqn.buffer_size", _positive_int, "replay buffer capacity"),
    ("--learning-starts", "dqn.learning_starts", int, "transitions before the first update"),
    ("--epsilon-start", "dqn.epsilon_start", float, "initial exploration rate"),
    ("--epsilon-end", "dqn.epsilon_end", float, "final exploration rate"),
    ("--exploration-fraction", "dqn.exploration_fraction", float, "share of episodes over which epsilon decays"),
    ("--target-update", "dqn.target_update", str, "soft | hard"),
    ("--tau", "dqn.tau", float, "soft target update rate"),
]


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    p = argparse.ArgumentParser(prog="adaptive_pruning.py", description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=MODES, help="what to run")
    p.add_argument("run_dirs", nargs="*", help="report mode: run folder(s); several write a comparison")
    for flag, path, kind, text in RUN_FLAGS:
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default: {_get(defaults, path)})")
    p.add_argument("--resume", action="store_true", help="continue training from --checkpoint")
    p.add_argument("--no-save-buffer", action="store_true", help="leave the replay buffer out of checkpoints")
    pruning = p.add_mutually_exclusive_group()
    pruning.add_argument("--structural", dest="structural", action="store_true", default=None,
                         help="slice weights: real speedups (default unless STRUCTURAL_PRUNING=0 in .env)")
    pruning.add_argument("--mask", dest="structural", action="store_false",
                         help="zero units with hooks: quality only, NO speedup")
    p.add_argument("--test-scenarios", default=None, help="scenarios for test mode (default: the training ones)")
    p.add_argument("--ablation-checkpoints", type=_words, default=(),
                   help="test mode: policies trained with --ablation (comma-separated checkpoints), scored on the "
                        "same prompts and observations and paired with --checkpoint's policy")
    ev = p.add_argument_group("evaluation (--mode eval; --lm-eval also in test mode)")
    ev.add_argument("--eval-models", default="dense",
                    help="comma-separated: dense, static:TARGET:INTENSITY, static:all (every action of "
                         "--targets x --intensities), policy:CHECKPOINT (default: dense)")
    ev.add_argument("--wikitext-path", default=None,
                    help="local wiki.test.raw (default: the Hub when online, else $ADAPTIVE_PRUNING_DATA)")
    ev.add_argument("--wikitext-samples", type=_positive_int, default=200, help="WikiText-2 windows scored at most (default: 200)")
    ev.add_argument("--eval-seq-len", type=_positive_int, default=2048, help="window length, capped at the context (default: 2048)")
    ev.add_argument("--eval-stride", type=_positive_int, default=None, help="window stride (default: seq len)")
    ev.add_argument("--lm-eval", action="store_true", help="also run lm-eval-harness zero-shot tasks")
    ev.add_argument("--eval-tasks", type=_words, default=None,
                    help="lm-eval tasks (default: arc_easy,hellaswag,winogrande,lambada_openai)")
    ev.add_argument("--task-data", action="append", default=[], metavar="TASK=PATH",
                    help="local data for a task (repeatable), e.g. arc_easy=../shared/data/ai2_arc/ARC-Easy-Test.jsonl")
    ev.add_argument("--eval-limit", type=_positive_int, default=None, help="documents per lm-eval task")
    bl = p.add_argument_group("baselines (--mode baselines) and export (--mode export)")
    bl.add_argument("--baseline-methods", type=_words, default=None,
                    help="structured methods: magnitude,wanda-sp,taylor,shortgpt (default: all)")
    bl.add_argument("--budgets", type=_floats, default=None,
                    help="shares of non-embedding parameters removed (default: 0.1,0.2,0.3,0.4,0.5)")
    bl.add_argument("--unstructured", type=_words, default=None,
                    help="quality-only references, e.g. wanda:0.5,wanda:2:4,sparsegpt:0.5 ('none' to skip)")
    bl.add_argument("--policy", action="append", default=[], metavar="CHECKPOINT",
                    help="add a policy's point to the sweep (repeatable)")
    bl.add_argument("--calibration-dataset", default=None, help="prompts for data-driven importance (default: builtin)")
    bl.add_argument("--calibration-samples", type=_positive_int, default=None, help="calibration prompts (default: 64)")
    bl.add_argument("--speed-repeats", type=_positive_int, default=None,
                    help="interleaved (dense, pruned) pairs per timed point (default: 3)")
    bl.add_argument("--export", dest="export_dir", default=None, metavar="DIR",
                    help="export mode: folder for the pruned model (save_pretrained)")
    bl.add_argument("--action", default=None, help="export mode: TARGET:INTENSITY to export, e.g. ffn_neurons:0.5")
    bl.add_argument("--baseline", default=None, help="export mode: METHOD@BUDGET to export, e.g. taylor@0.3")
    p.add_argument("--debug", action="store_true", help="verbose logging and full tracebacks")
    return p


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, set[str]]:
    """RunConfig from defaults + flags; also the config paths the user set explicitly."""
    cfg = RunConfig(mode=args.mode)
    explicit: set[str] = set()
    nested = {"env": {}, "reward": {}, "dqn": {}}
    top = {}
    for flag, path, _, _ in RUN_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        explicit.add(path)
        if "." in path:
            group, name = path.split(".")
            nested[group][name] = value
        else:
            top[path] = value
    structural = args.structural
    if structural is None:
        structural = os.environ.get("STRUCTURAL_PRUNING", "1").strip() not in ("0", "false", "False")
    else:
        explicit.add("structural")
    cfg = dataclasses.replace(cfg, **top, structural=structural, resume=args.resume,
                              save_buffer=not args.no_save_buffer,
                              env=dataclasses.replace(cfg.env, **nested["env"]),
                              reward=dataclasses.replace(cfg.reward, **nested["reward"]),
                              dqn=dataclasses.replace(cfg.dqn, **nested["dqn"], seed=top.get("seed", cfg.seed)))
    return cfg, explicit


def validate(cfg: RunConfig) -> None:
    """Catch bad values before any model or data is loaded."""
    from model_loader import check_model_name
    from nlp_analyzer import BACKENDS
    from controller.contention import parse_scenarios
    check_model_name(cfg.model)
    if cfg.nlp_backend not in ("auto", *BACKENDS):
        raise ValueError(f"--nlp-backend must be auto or one of {', '.join(BACKENDS)}, got {cfg.nlp_backend}")
    parse_scenarios(cfg.scenarios)
    if cfg.episodes <= 0 or cfg.episodes > 10_000_000:
        raise ValueError(f"--episodes must be between 1 and 10,000,000, got {cfg.episodes}")
    if not 0 < cfg.test_fraction < 1:
        raise ValueError(f"--test-fraction must be in (0, 1), got {cfg.test_fraction}")
    if cfg.env.timing not in ("table", "interleaved"):
        raise ValueError(f"--timing must be table or interleaved, got {cfg.env.timing}")
    if cfg.env.load_timing not in ("scaled", "measured"):
        raise ValueError(f"--load-timing must be scaled or measured, got {cfg.env.load_timing}")
    if cfg.env.max_new_tokens > 100_000:
        raise ValueError(f"--max-new-tokens {cfg.env.max_new_tokens} is absurd: use at most the model's context")
    if cfg.dqn.target_update not in ("soft", "hard"):
        raise ValueError(f"--target-update must be soft or hard, got {cfg.dqn.target_update}")
    if not 0 <= cfg.dqn.gamma <= 1:
        raise ValueError(f"--gamma must be in [0, 1], got {cfg.dqn.gamma}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return run(args)
    except KeyboardInterrupt:
        logging.getLogger("adaptive_pruning").warning("interrupted; checkpoint and partial report were saved")
        return 130
    except Exception as err:   # noqa: BLE001 — the CLI boundary turns every failure into one clear line
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    from modes import run as modes

    if args.mode == "report":
        if not args.run_dirs:
            raise ValueError("--mode report needs one or more run folders, e.g. reports/train-...")
        modes.run_report([Path(d) for d in args.run_dirs])
        return 0
    cfg, explicit = config_from_args(args)
    validate(cfg)
    if args.mode == "train":
        modes.run_train(cfg)
    elif args.mode == "test":
        modes.run_test(cfg, explicit, test_scenarios=args.test_scenarios,
                       eval_cfg=eval_config(args) if args.lm_eval else None,
                       ablation_checkpoints=args.ablation_checkpoints)
    elif args.mode == "eval":
        modes.run_eval(cfg, eval_config(args), args.eval_models)
    elif args.mode == "baselines":
        modes.run_baselines(cfg, baseline_config(args))
    else:
        modes.run_export(cfg, args.export_dir, action=args.action, baseline=args.baseline,
                         calibration_dataset=args.calibration_dataset or "builtin",
                         samples=args.calibration_samples or 64)
    return 0


def baseline_config(args: argparse.Namespace):
    """BaselineConfig from the flags that were given (the rest keep the dataclass defaults)."""
    from evaluation.baselines import BaselineConfig
    given = {"methods": args.baseline_methods, "budgets": args.budgets, "calibration_dataset": args.calibration_dataset,
             "calibration_samples": args.calibration_samples, "speed_repeats": args.speed_repeats}
    if args.unstructured is not None:
        given["unstructured"] = () if args.unstructured == ("none",) else args.unstructured
    return BaselineConfig(policies=tuple(args.policy), eval=eval_config(args),
                          **{k: v for k, v in given.items() if v is not None})


def eval_config(args: argparse.Namespace):
    """EvalConfig from the evaluation flags (imported lazily: lm-eval is slow to import)."""
    from evaluation.suite import DEFAULT_TASKS, EvalConfig
    task_data = {}
    for item in args.task_data:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise ValueError(f"--task-data expects TASK=PATH, got '{item}'")
        task_data[task.strip()] = path.strip()
    tasks = tuple(args.eval_tasks or DEFAULT_TASKS) if args.lm_eval else ()
    if task_data and not args.lm_eval:
        raise ValueError("--task-data only matters with --lm-eval")
    return EvalConfig(wikitext_path=args.wikitext_path, seq_len=args.eval_seq_len, stride=args.eval_stride,
                      wikitext_samples=args.wikitext_samples, tasks=tasks, task_data=task_data,
                      eval_limit=args.eval_limit)


def cli() -> int:
    """The process entry point: a signal at any moment ends in 0 or 130, never a kill mid-shutdown.

    SIGTERM is an interrupt for the whole process (not only inside training), and once main has
    returned both signals are ignored: CPython resets Python-level handlers to the default action
    during finalization, so a late Ctrl-C would otherwise kill the process while it tears down.
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return main()
    except KeyboardInterrupt:   # landed after main's own handler had finished
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(cli())
