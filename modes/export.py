"""--mode export: save a pruned model that transformers loads (and, with --gguf, llama.cpp)."""
from __future__ import annotations

import logging
from pathlib import Path

from common.config import RunConfig
from modes.validate import naming
from pruners import PruningAction

log = logging.getLogger(__name__)


def run_export(cfg: RunConfig, out_dir: str | None, action: str | None, baseline: str | None,
               gguf: bool = False) -> Path:
    """Save a pruned model that `from_pretrained` loads (plus tokenizer and pruning.json; model.gguf with --gguf).

    An --action export uses the run's engine (importance, calibration, allocation, recovery); a plan a stock
    LlamaConfig cannot hold (per-layer widths, layer replacement maps) is written with its per-layer config and
    modeling code (load it with trust_remote_code=True; pruning.json says why).
    """
    from common.calibration import calibration_set
    from model_loader import embedded_gguf_path, load_model
    if not out_dir:
        raise ValueError("--mode export needs --export DIR")
    if (action is None) == (baseline is None):
        raise ValueError("--mode export needs exactly one of --action TARGET:INTENSITY or --baseline METHOD@BUDGET")
    with naming("--action"):
        target = PruningAction.parse(action) if action else None
    loaded = load_model(cfg.model, device=cfg.device)
    vocab_gguf = embedded_gguf_path() if gguf and loaded.source == "embedded" else None
    if baseline:
        from pruners.methods.static_methods import export_baseline
        path = export_baseline(loaded, baseline, Path(out_dir), calibration_set(cfg.calibration).texts,
                               cfg.calibration.max_tokens, gguf=gguf, vocab_gguf=vocab_gguf)
    else:
        from environments.session import build_engine
        from pruners.export.checkpoint import export_pruned
        path = export_pruned(loaded, build_engine(cfg, loaded, [target]), target, out_dir, gguf=gguf,
                             vocab_gguf=vocab_gguf)
    print(f"exported: {path}")
    return path
