"""Cheap checks of a run, made before any model or data set is loaded: names, files it reads, every place it
writes, and whether a checkpoint it continues or tests fits the run.

Why up front: a typo found after a 20 s model load (or after the Hub data set failed offline) costs the user a
round trip and hides the real mistake behind a later one; a checkpoint path that cannot be written, found when
training ends, loses the training. Value ranges are not here: they are declared beside the config fields
(common.config LIMITS) and checked by modes.flags.check_values.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.config import PROBE_IMPORTANCE, RunConfig, hardware_kind, uses_lookahead, uses_probe
from common.files import PROJECT_ROOT, clean_orphaned_temp_files

log = logging.getLogger(__name__)

REPORT_MODES = ("train", "test", "eval", "baselines")


@contextlib.contextmanager
def naming(flag: str) -> Iterator[None]:
    """A failure inside the block names ``flag`` (a data set, model or file loader knows its input, not the flag
    the user typed): "argument FLAG: <message>" unless the message already names it."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as err:   # noqa: BLE001 — re-raised with the flag, one line at the CLI boundary
        if flag in str(err):
            raise
        raise ValueError(f"argument {flag}: {err}") from err


def validate(cfg: RunConfig, *, export_dir: str | None = None, overwrite: bool = False) -> None:
    from machine.contention import parse_scenarios
    from environments.session import action_space
    from model_loader import check_model_name
    from nlp_analyzer import BACKENDS
    with naming("--model"):
        check_model_name(cfg.model)
    if cfg.nlp_backend not in ("auto", *BACKENDS):
        raise ValueError(f"--nlp-backend must be auto or one of {', '.join(BACKENDS)}, got {cfg.nlp_backend}")
    check_probe(cfg)
    if cfg.offline.ray_address and cfg.offline.executor != "ray":
        raise ValueError("--ray-address only matters with --executor ray: add it, or drop --ray-address")
    with naming("--scenarios"):
        levels = [sc.name for sc in parse_scenarios(cfg.scenarios)]
    if cfg.environment == "offline" and "idle" not in levels:
        raise ValueError(f"--scenarios {cfg.scenarios}: the offline environment needs 'idle' (every calibration "
                         "round's reference for the slowdown and the latency budget)")
    try:
        action_space(cfg)
    except ValueError as err:
        raise ValueError(f"--targets/--intensities: {err}") from err
    if cfg.dqn.learning_starts > cfg.dqn.buffer_size:
        raise ValueError(f"argument --learning-starts: {cfg.dqn.learning_starts} exceeds --buffer-size "
                         f"{cfg.dqn.buffer_size}: no update would ever run (e.g. --learning-starts 16)")
    for flag, path in (("--latency-table", cfg.latency_table), ("--telemetry-trace", cfg.telemetry_trace)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} not found: pass the file an earlier run wrote "
                                    "(its latency_table.json or metrics.json)")
    check_outputs(cfg, export_dir=export_dir, overwrite=overwrite)


def check_probe(cfg: RunConfig) -> None:
    """The per-request prefill probe (features, unit selection) and the dense look-ahead are wired into the offline
    study's train and test only: every other path decides or prunes before a prefill (or look-ahead) it could read."""
    per_prompt = uses_probe(cfg.state_features) or uses_lookahead(cfg.state_features)
    if per_prompt and cfg.environment != "offline":
        raise ValueError(f"argument --state-features: {cfg.state_features} is computed in the offline study only: "
                         f"add --environment offline, or use --state-features {hardware_kind(cfg.state_features)}")
    shortest = min(cfg.env.min_reference_tokens, cfg.env.max_new_tokens)   # a data set answer is at least this long
    if uses_lookahead(cfg.state_features) and cfg.offline.lookahead_tokens >= shortest:
        raise ValueError(f"argument --lookahead-tokens: {cfg.offline.lookahead_tokens} leaves no reference token to "
                         f"decide on (references can be {shortest} tokens: --max-new-tokens/--min-reference-tokens): "
                         f"pass --lookahead-tokens below {shortest}")
    if cfg.importance == PROBE_IMPORTANCE and (cfg.mode not in ("train", "test") or cfg.environment != "offline"):
        raise ValueError(f"argument --importance: {PROBE_IMPORTANCE} chooses units per request in the offline study's "
                         "train and test only: use --mode train/test --environment offline, or --importance fluctuation")


def check_outputs(cfg: RunConfig, *, export_dir: str | None = None, overwrite: bool = False) -> None:
    """Everything the run will write can be written, before it starts; orphaned temp files of a killed
    earlier run there are removed."""
    if cfg.mode in REPORT_MODES:
        report = Path(cfg.report_dir)
        not_root(report, "--report-dir", "reports")
        check_writable(report, "--report-dir")
        for folder in (report, *(p for p in report.iterdir() if p.is_dir())):
            clean_orphaned_temp_files(folder)
    if cfg.mode == "train":
        check_checkpoint_target(Path(cfg.checkpoint))
        if cfg.resume and not Path(cfg.checkpoint).is_file():
            raise ValueError(f"argument --checkpoint: {_short(Path(cfg.checkpoint))!r} does not exist, so --resume has nothing to "
                             "continue: drop --resume to start training")
    if cfg.mode == "test":
        checkpoint = Path(cfg.checkpoint)
        if checkpoint.is_dir():
            raise ValueError(f"argument --checkpoint: {cfg.checkpoint!r} is a folder, not a checkpoint file "
                             "(e.g. --checkpoint checkpoints/policy.pt)")
    if cfg.mode == "export":
        check_export_target(export_dir, overwrite)
    if cfg.mode == "heal" and cfg.heal.out_dir:
        not_root(Path(cfg.heal.out_dir), "--heal-out", ".cache/heal/tiny")
        check_creatable(Path(cfg.heal.out_dir), "--heal-out", ".cache/heal/tiny")


def not_root(folder: Path, flag: str, example: str) -> None:
    if folder.resolve() == PROJECT_ROOT:
        raise ValueError(f"argument {flag}: {str(folder)!r} is the repository root: pass a folder of its own "
                         f"(e.g. {flag} {example})")


def check_writable(folder: Path, flag: str) -> None:
    """The folder can be created and written, before hours of work go into it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"argument {flag}: {str(folder)!r} cannot be created ({err.strerror}): pass a writable "
                         "folder") from err
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"argument {flag}: {str(folder)!r} is not a writable folder: pass one you can write to")


def check_checkpoint_target(path: Path) -> None:
    """A checkpoint can be written at ``path``: a temp file named as the atomic write names it (the longest
    sibling name an offline run writes, NAME.no_prompt.seedN.pt) is created there and removed again."""
    flag, fix = "argument --checkpoint", "(e.g. --checkpoint checkpoints/policy.pt)"
    try:
        if not path.name or path.is_dir() or str(path).endswith(os.sep):
            raise ValueError(f"{flag}: {_short(path)!r} names a folder, not a file {fix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_orphaned_temp_files(path.parent)
        longest = f".{path.stem}.no_prompt.seed999{path.suffix}.pid{os.getpid()}-"
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=longest, suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{flag}: {_short(path)!r} cannot be written ({err.strerror}) {fix}") from err


def check_export_target(export_dir: str | None, overwrite: bool) -> None:
    fix = "(e.g. --export exports/tiny-ffn50)"
    if not export_dir:
        raise ValueError(f"--mode export needs --export DIR {fix}")
    folder = Path(export_dir)
    not_root(folder, "--export", "exports/tiny-ffn50")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"argument --export: {export_dir!r} is a file, not a folder {fix}")
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if held and not overwrite:
        raise ValueError(f"argument --export: {export_dir!r} already holds {len(held)} entries ({', '.join(held[:3])}"
                         f"{', ...' if len(held) > 3 else ''}): pass a new or empty folder, or add --overwrite")
    check_creatable(folder, "--export", "exports/tiny-ffn50")


def check_creatable(folder: Path, flag: str, example: str) -> None:
    """The folder exists as one, or can be made under its nearest existing parent (not made yet: a run refused
    later by a cheap check leaves nothing behind)."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"argument {flag}: {str(folder)!r} cannot be created under {str(existing)!r} "
                         f"(e.g. {flag} {example})")


def check_checkpoint_fits(cfg: RunConfig, payload: dict, flag: str = "--checkpoint") -> None:
    """The checkpoint's policy can act in this run (model, action space, state schema, engine), checked on the
    configs alone, before any model loads or any importance statistic is computed."""
    from controller.checkpointing import CheckpointError, check_compatible
    from environments.session import action_space, engine_mismatch
    from environments.state import state_feature_names
    trained = payload.get("config")
    if not isinstance(trained, dict):
        raise ValueError(f"argument {flag}: {cfg.checkpoint!r} has no stored config: retrain it with this version")
    model = trained.get("model")
    if model and "auto" not in (model, cfg.model) and model != cfg.model:
        raise ValueError(f"argument --model: {cfg.model!r}, but {flag} {cfg.checkpoint!r} was trained on "
                         f"{model!r}: pass --model {model} or a checkpoint trained on {cfg.model}")
    # probe feature names depend on the model's depth, not loaded yet: a probe run takes the checkpoint's (the
    # offline environment checks them against its data), and the rest must match
    trained_probe = [n.removeprefix("probe.") for n in payload.get("state_features") or [] if n.startswith("probe.")]
    if uses_probe(cfg.state_features) and not trained_probe:
        raise ValueError(f"argument {flag}: {cfg.checkpoint!r} was trained without probe features, this run has "
                         f"--state-features {cfg.state_features}: drop --state-features to use the checkpoint's, or retrain")
    try:
        labels = [a.label for a in action_space(cfg)]
        names = state_feature_names(cfg.state_features, trained_probe, labels)
        check_compatible(payload, model_id=payload.get("model_id"), state_features=names,
                         action_space=labels)
    except CheckpointError as err:
        raise ValueError(f"argument {flag}: {cfg.checkpoint!r} {err}: drop --targets/--intensities/--state-features "
                         "to use the checkpoint's, or retrain") from err
    fix = engine_mismatch(cfg, trained)
    if fix:
        raise ValueError(f"argument {flag}: {cfg.checkpoint!r} was trained on another engine: run with {fix}")


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 80 else text[:40] + "..." + text[-30:]

