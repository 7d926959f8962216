#!/usr/bin/env python
"""Runtime-adaptive pruning via RL: train, test, evaluate and report (see README.md).

Thin CLI: parses arguments (modes/flags.py: every flag and the modes where it has an effect),
builds the configs and calls the mode's function in modes/. Bad input ends in one line naming the
fix and exit code 2 (a traceback only with --debug).
"""
from __future__ import annotations

import sys

from runtime import openmp  # torch-free: libgomp reads its wait policy once, when torch loads

# The policy measured for this machine (runtime/openmp.py): cached, else measured now (1-3 min, once);
# never measured for --help or report mode, which load no model.
openmp.configure(measure_if_missing=not {"-h", "--help", "report", "--mode=report"} & set(sys.argv[1:]))

import argparse
import logging
import signal
from pathlib import Path

from common import hub
from common.signals import RunInterrupted

from modes.flags import EXIT_USAGE, MODES, Parser, UsageError, apply_config, baseline_config, build_parser, check_flags, \
    check_values, eval_config, overview, read_config_file, run_config, \
    serve_config

log = logging.getLogger("adaptive_pruning")


def parse(argv: list[str]) -> argparse.Namespace:
    """Two passes: --mode (or the --config file's mode) picks the parser, whose --help lists that mode's flags."""
    pre = Parser(prog="adaptive_pruning.py", add_help=False, allow_abbrev=False)
    pre.add_argument("--mode")
    pre.add_argument("--config")
    first, _ = pre.parse_known_args(argv)
    mode, data = first.mode if first.mode in MODES else None, None
    if first.config is not None:
        try:
            data = read_config_file(first.config)
        except UsageError as err:
            pre.error(str(err))
        if first.mode is None and data.get("mode") in MODES:
            mode = data["mode"]
            argv = ["--mode", mode, *argv]
    if first.mode is None and mode is None and {"-h", "--help"} & set(argv):
        print(overview())
        raise SystemExit(0)
    parser = build_parser(mode)
    args = parser.parse_args(argv)
    if data is not None:
        try:
            apply_config(args, data, first.config)
        except UsageError as err:
            parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        hub.check_env_file()
        check_flags(args)
        check_values(args)
        return run(args)
    except RunInterrupted as err:
        log.warning("interrupted; saved: %s", err.saved)
        return 130
    except KeyboardInterrupt:
        log.warning("interrupted before anything was saved: no checkpoint and no complete report were written")
        return 130
    except Exception as err:   # noqa: BLE001 — the CLI boundary turns every failure into one clear line
        if args.debug and not isinstance(err, UsageError):
            raise
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE


def one_line(message: str) -> str:
    """The message on one line, any very long token (a 5,000-character value) cut short."""
    return " ".join(word if len(word) <= 120 else word[:60] + "...(" + str(len(word)) + " characters)"
                    for word in message.split())


def run(args) -> int:
    """Build the mode's configs (cheap checks first), then call its function in modes/."""
    from common import hub  # noqa: F401  (sets the HF offline flags before transformers/datasets/lm_eval load)
    if args.mode == "report":
        from modes.report import run_report
        if not args.run_dirs:
            raise ValueError("--mode report needs one or more run folders, e.g. reports/train-...")
        run_report([Path(d) for d in args.run_dirs])
        return 0
    from modes.validate import validate
    cfg, explicit = run_config(args)
    validate(cfg, export_dir=args.export, overwrite=bool(args.overwrite))
    if args.mode == "train":
        from modes.train import run_train
        run_train(cfg)
    elif args.mode == "test":
        from modes.test import run_test
        run_test(cfg, explicit, test_scenarios=args.test_scenarios,
                 eval_cfg=eval_config(args) if args.lm_eval else None,
                 ablation_checkpoints=args.ablation_checkpoints or ())
    elif args.mode == "eval":
        from modes.eval import run_eval
        run_eval(cfg, eval_config(args), args.eval_models or "dense")
    elif args.mode == "heal":
        from modes.heal import run_heal
        run_heal(cfg)
    elif args.mode == "serve":
        from modes.serve import run_serve
        run_serve(cfg, serve_config(args))
    elif args.mode == "baselines":
        from modes.baselines import run_baselines
        run_baselines(cfg, baseline_config(args))
    else:
        from modes.export import run_export
        run_export(cfg, args.export, action=args.action, baseline=args.baseline, gguf=bool(args.gguf))
    return 0


def cli() -> int:
    """The process entry point: a signal at any moment ends in 0 or 130, never a kill mid-shutdown.

    SIGTERM is an interrupt for the whole process (not only inside training), and once main has
    returned both signals are ignored: CPython resets Python-level handlers to the default action
    during finalization, so a late Ctrl-C would otherwise kill the process while it tears down.
    """
    from common.signals import install_sigterm_interrupt

    install_sigterm_interrupt()
    try:
        return main()
    except KeyboardInterrupt:   # landed after main's own handler had finished
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(cli())
