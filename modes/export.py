"""--mode export: save a pruned model that stock transformers loads."""
from __future__ import annotations

import logging
from pathlib import Path

from common.config import CalibrationConfig, RunConfig
from pruners import PruningAction, PruningEngine

log = logging.getLogger(__name__)


def run_export(cfg: RunConfig, out_dir: str | None, action: str | None, baseline: str | None,
               calibration: CalibrationConfig = CalibrationConfig()) -> Path:
    """Save a pruned model that stock `from_pretrained` loads (plus tokenizer and pruning.json)."""
    from model_loader import load_model
    if not out_dir:
        raise ValueError("--mode export needs --export DIR")
    if (action is None) == (baseline is None):
        raise ValueError("--mode export needs exactly one of --action TARGET:INTENSITY or --baseline METHOD@BUDGET")
    target = PruningAction.parse(action) if action else None
    loaded = load_model(cfg.model, device=cfg.device)
    if baseline:
        from evaluation.baselines import calibration_texts
        from pruners.baseline_methods import export_baseline
        path = export_baseline(loaded, baseline, Path(out_dir), calibration_texts(calibration.dataset, calibration.samples))
    else:
        from pruners.export import export_pruned
        engine = PruningEngine(loaded.model, importance=cfg.importance, tokenizer=loaded.tokenizer)
        path = export_pruned(loaded, engine, target, out_dir)
    print(f"exported: {path}")
    return path
