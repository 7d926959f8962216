"""Cheap checks of a RunConfig, run before any model or data set is loaded.

Why up front: a typo found after a 20 s model load (or after the Hub data set failed offline)
costs the user a round trip and hides the real mistake behind a later one.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.config import ENVIRONMENTS, EXECUTORS, STATE_FEATURES, RunConfig


def validate(cfg: RunConfig) -> None:
    from machine.contention import parse_scenarios
    from environments.reward import OBJECTIVES
    from environments.session import action_space
    from model_loader import check_model_name
    from nlp_analyzer import BACKENDS
    check_model_name(cfg.model)
    if cfg.nlp_backend not in ("auto", *BACKENDS):
        raise ValueError(f"--nlp-backend must be auto or one of {', '.join(BACKENDS)}, got {cfg.nlp_backend}")
    if cfg.environment not in ENVIRONMENTS:
        raise ValueError(f"--environment must be one of {', '.join(ENVIRONMENTS)}, got {cfg.environment}")
    if cfg.offline.executor not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, got {cfg.offline.executor}")
    if cfg.offline.ray_address and cfg.offline.executor != "ray":
        raise ValueError("--ray-address only matters with --executor ray: add it, or drop --ray-address")
    if cfg.state_features not in STATE_FEATURES:
        raise ValueError(f"--state-features must be one of {', '.join(STATE_FEATURES)}, got {cfg.state_features}")
    levels = [sc.name for sc in parse_scenarios(cfg.scenarios)]
    if cfg.reward.objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.reward.objective}")
    if not 0 < cfg.reward.slo_share <= 1 or cfg.reward.quality_budget <= 0 or cfg.reward.multiplier_lr < 0:
        raise ValueError("--slo-share must be in (0, 1], --quality-budget > 0 and --multiplier-lr >= 0")
    if cfg.environment == "offline" and "idle" not in levels:
        raise ValueError(f"--scenarios {cfg.scenarios}: the offline environment needs 'idle' (every calibration "
                         "round's reference for the slowdown and the latency budget)")
    try:
        action_space(cfg)
    except ValueError as err:
        raise ValueError(f"--targets/--intensities: {err}") from err
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
    for flag, path in (("--latency-table", cfg.latency_table), ("--telemetry-trace", cfg.telemetry_trace)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} not found: pass the file an earlier run wrote "
                                    "(its latency_table.json or metrics.json)")
    if cfg.mode in ("train", "test", "eval", "baselines"):
        check_writable(Path(cfg.report_dir), "--report-dir")


def check_writable(folder: Path, flag: str) -> None:
    """The report folder can be created and written, before hours of work go into it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {folder} cannot be created ({err.strerror}): pass a writable folder") from err
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder} is not a writable folder: pass one you can write to")
