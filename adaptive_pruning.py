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

import logging
import signal
from pathlib import Path

from modes.flags import EXIT_USAGE, UsageError, baseline_config, build_parser, check_flags, \
    eval_config, run_config, serve_config

log = logging.getLogger("adaptive_pruning")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        check_flags(args)
        return run(args)
    except KeyboardInterrupt:
        log.warning("interrupted; checkpoint and partial report were saved")
        return 130
    except Exception as err:   # noqa: BLE001 — the CLI boundary turns every failure into one clear line
        if args.debug and not isinstance(err, UsageError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


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
    validate(cfg)
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
        run_export(cfg, args.export, action=args.action, baseline=args.baseline)
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
