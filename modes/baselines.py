"""--mode baselines: static structured/unstructured baselines (and policy points) on one protocol."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from common.config import RunConfig
from common.signals import sigterm_as_interrupt
from modes.outputs import finish_run, metrics_skeleton
from reporting import provenance
from reporting import render as reporting

log = logging.getLogger(__name__)


def run_baselines(cfg: RunConfig, bcfg) -> Path:
    """Static structured and unstructured baselines (and policy points) on one protocol."""
    from evaluation.baselines import run_baselines as sweep
    from model_loader import load_model
    from runtime.dtype import set_kernel
    from runtime.matvec import matvec_kernel

    loaded = load_model(cfg.model, device=cfg.device)
    # every arm decodes on the same kernel as the policy's runs (quantized arms included)
    set_kernel(loaded.model, matvec_kernel(cfg.matvec, next(loaded.model.parameters()).device))
    run_dir = reporting.RunDir.create(Path(cfg.report_dir), "baselines", loaded.name)
    run_dir.write_config({**cfg.to_dict(), "baselines": dataclasses.asdict(bcfg)})
    prov = provenance.collect(seed=cfg.seed, model=loaded, device=str(next(loaded.model.parameters()).device))
    if loaded.source == "local":        # a --mode heal folder: its methods score the healed dense weights
        from pruners.recovery.elastic import find_menu
        menu = find_menu(loaded.name)
        prov["healed"] = menu.describe() if menu is not None else None

    def write(rows, partial=True):
        metrics = metrics_skeleton("baselines", cfg, prov, [], baselines=rows, baseline_config=dataclasses.asdict(bcfg))
        metrics.update(partial=partial, partial_reason="run in progress" if partial else None)
        run_dir.write_metrics(metrics)
        return metrics

    with sigterm_as_interrupt():
        rows = sweep(loaded, bcfg, out_dir=run_dir.path, on_row=write)
    return finish_run(run_dir, write(rows, partial=False))
