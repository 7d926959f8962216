"""--mode export: save a pruned model that stock transformers loads."""
from __future__ import annotations

import logging
from pathlib import Path

from common.config import RunConfig
from modes.validate import naming
from pruners import PruningAction

log = logging.getLogger(__name__)


def run_export(cfg: RunConfig, out_dir: str | None, action: str | None, baseline: str | None) -> Path:
    """Save a pruned model that stock `from_pretrained` loads (plus tokenizer and pruning.json).

    An --action export uses the run's engine (importance, calibration, allocation, recovery); a plan stock
    transformers cannot express (per-layer widths, layer replacement maps) is refused with what to use instead.
    """
    from common.calibration import calibration_set
    from model_loader import load_model
    if not out_dir:
        raise ValueError("--mode export needs --export DIR")
    if (action is None) == (baseline is None):
        raise ValueError("--mode export needs exactly one of --action TARGET:INTENSITY or --baseline METHOD@BUDGET")
    with naming("--action"):
        target = PruningAction.parse(action) if action else None
    loaded = load_model(cfg.model, device=cfg.device)
    if baseline:
        from pruners.static_methods import export_baseline
        path = export_baseline(loaded, baseline, Path(out_dir), calibration_set(cfg.calibration).texts,
                               cfg.calibration.max_tokens)
    else:
        from environments.session import build_engine
        from pruners.export import export_pruned
        path = export_pruned(loaded, build_engine(cfg, loaded, [target]), target, out_dir)
    print(f"exported: {path}")
    return path
