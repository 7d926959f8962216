"""--mode eval: WikiText-2 (and lm-eval tasks) for dense, static and policy-routed models."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from common.config import RunConfig
from common.signals import sigterm_as_interrupt
from controller import checkpointing
from controller.router import per_request_probe
from environments.session import action_space, build_engine, engine_mismatch
from modes.outputs import finish_run, metrics_skeleton
from modes.validate import naming
from reporting import provenance
from reporting import render as reporting

log = logging.getLogger(__name__)


def run_eval(cfg: RunConfig, eval_cfg, specs: str) -> Path:
    """WikiText-2 (and with --lm-eval, zero-shot tasks) for dense, static and policy-routed models."""
    from evaluation.routes import expand_static_all, parse_specs
    from evaluation.suite import LM_EVAL_DIR, run_evaluation
    from model_loader import load_model

    with naming("--eval-models"):
        specs = expand_static_all(specs, action_space(cfg))
        parsed = parse_specs(specs)
    for spec in parsed:
        if spec.kind == "policy":   # one engine per run: the policy must have learned on this one's menu
            with naming("--eval-models"):
                trained = checkpointing.load_checkpoint(Path(spec.checkpoint))["config"]
            problem = per_request_probe(trained)
            if problem:
                raise ValueError(f"argument --eval-models: {spec.label} {problem}, which routed evaluation does not "
                                 "compute: score it with --mode test --checkpoint instead")
            fix = engine_mismatch(cfg, trained)
            if fix:
                raise ValueError(f"{spec.label} was trained on another engine: evaluate it with {fix}")

    loaded = load_model(cfg.model, device=cfg.device)
    static = [spec.action for spec in parsed if spec.kind == "static"]
    engine = build_engine(cfg, loaded, static)
    run_dir = reporting.RunDir.create(Path(cfg.report_dir), "eval", loaded.name)
    run_dir.write_config({**cfg.to_dict(), "eval": dataclasses.asdict(eval_cfg), "eval_models": specs})
    prov = provenance.collect(seed=cfg.seed, model=loaded, device=str(next(loaded.model.parameters()).device),
                              engine=engine.describe(static))
    with sigterm_as_interrupt():
        block = run_evaluation(loaded, specs, eval_cfg, engine=engine, output_dir=run_dir.path / LM_EVAL_DIR)
    metrics = metrics_skeleton("eval", cfg, prov, sorted(block["models"]), evaluation=block)
    return finish_run(run_dir, metrics)
