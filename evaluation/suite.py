"""Evaluation mode: WikiText-2 perplexity, lm-eval zero-shot tasks and speed for dense, static and policy models.

Why one entry point: the thesis table compares every evaluated model on the same protocol, so
all of them are scored here with one config, one text, one task plan and one probe, and the
result is the ``"evaluation"`` block of metrics.json::

    block = run_evaluation(loaded, "dense,static:ffn_neurons:0.5,policy:checkpoints/p.pt", EvalConfig())
    metrics["evaluation"] = block   # {"models": {label: {...}}, "config": ..., "lm_eval_version": ...}

Each model entry holds ``wikitext`` (ppl, nll, tokens, windows, protocol), ``tasks`` (acc, acc_norm,
their stderr, n per task), ``speed`` (probe tokens/s, latency, peak memory, controller overhead)
and ``actions`` (action label -> number of decisions; dense/static count every scored request).

KV-cache actions prune the cache after a prefill; perplexity and lm-eval scoring are single
teacher-forced forwards with no cache, so under a kv_cache action they equal the dense model's
and only the speed probe (real generation) shows the action.
"""
from __future__ import annotations

from common import hub  # noqa: F401  (HF offline flags before transformers/datasets/lm_eval load)

import logging
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from common.config import EvalConfig
from common.markdown import fmt, md_table

from evaluation.routes import EvaluationError, ModelSpec, Route, RouterFactory, build_route, parse_specs
from evaluation.speed import ResourceMonitor, probe_speed
from evaluation.lm_eval_run import evaluate_tasks, lm_eval_version
from evaluation.lm_eval_tasks import TaskPlan, prepare_tasks
from evaluation.wikitext import CorpusText, compute_perplexity, load_wikitext2_test
from pruners.targets import get_target

log = logging.getLogger(__name__)

LM_EVAL_DIR = "lm_eval"     # lm-eval's own results and samples files, inside a run folder


def run_evaluation(loaded, specs: str | Sequence[str] | Sequence[ModelSpec], config: EvalConfig,
                   engine=None, router_factory: RouterFactory | None = None, output_dir: Path | None = None) -> dict:
    """Score every spec; returns the metrics.json ``"evaluation"`` block.

    ``output_dir`` (the run folder's ``lm_eval/``): lm-eval's own results and samples files, one sub-folder
    per model (``evaluation.lm_eval_run.evaluate_tasks``), listed in each model's ``lm_eval_files``.

    `engine` is the shared `pruners.PruningEngine` (built with `config.prune_mode` when omitted and
    a spec needs one); `router_factory` loads a policy checkpoint (default `policy.load_router`).
    Every input (specs, checkpoints, data files, task names) is checked before any scoring.
    """
    parsed = list(specs) if specs and all(isinstance(s, ModelSpec) for s in specs) else parse_specs(specs)
    corpus = load_wikitext2_test(config.wikitext_path) if config.wikitext else None
    plan = prepare_tasks(config.tasks, config.task_data) if config.tasks else None
    task_manager = plan.task_manager() if plan else None
    if engine is None and any(spec.needs_engine for spec in parsed):
        from pruners import PruningEngine
        engine = PruningEngine(loaded.model, mode=config.prune_mode, tokenizer=loaded.tokenizer)
    routes = [build_route(spec, loaded, engine, router_factory) for spec in parsed]

    models = {}
    for route in routes:
        log.info("evaluating %s", route.label)
        if get_target(route.spec.action.target).while_generating:
            log.warning("%s: scoring is teacher-forced without a cache, so its perplexity and accuracies "
                        "equal the dense model's; only the speed probe reflects the action", route.label)
        try:
            models[route.label] = evaluate_route(loaded, route, corpus, plan, task_manager, config,
                                                 None if output_dir is None else Path(output_dir) / folder_name(route.label))
        finally:
            close = getattr(getattr(route, "router", None), "close", None)
            if close is not None:
                close()             # a policy router's own telemetry thread
    block = {"models": models, "config": asdict(config),
             "lm_eval_version": lm_eval_version() if plan else None,
             "task_data": plan.data if plan else {}}
    log.info("evaluation summary\n%s", format_table(block))
    return block


def folder_name(label: str) -> str:
    """'static:ffn_neurons:0.5' -> 'static-ffn_neurons-0.5': one folder per evaluated model."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "model"


def evaluate_route(loaded, route: Route, corpus: CorpusText | None, plan: TaskPlan | None, task_manager,
                   config: EvalConfig, output_dir: Path | None = None) -> dict:
    """One model: perplexity, tasks and the speed probe under the route, resources over all three."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    started = time.perf_counter()
    with ResourceMonitor(device) as monitor, route.activate():
        ppl = (compute_perplexity(model, tokenizer, corpus, seq_len=config.seq_len, stride=config.stride,
                                  max_windows=config.wikitext_samples, batch_size=config.wikitext_batch_size,
                                  route=route, context_length=loaded.context_length, progress=config.progress)
               if corpus is not None else None)
        tasks = (evaluate_tasks(model, tokenizer, plan, route, task_manager=task_manager, limit=config.eval_limit,
                                batch_size=config.batch_size, bootstrap_iters=config.bootstrap_iters,
                                output_dir=output_dir, num_fewshot=config.num_fewshot)
                 if plan is not None else None)
        scored_actions = dict(route.actions)
        speed = (probe_speed(model, tokenizer, route, prompt_tokens=config.probe_prompt_tokens,
                             new_tokens=config.probe_new_tokens, repeats=config.probe_repeats)
                 if config.speed_probe else None)
    requests = (ppl.windows if ppl else 0) + (tasks.documents if tasks else 0)
    speed_block = {
        **(asdict(speed) if speed else {}),
        **asdict(monitor.usage),
        "wikitext_s_per_window": ppl.seconds / ppl.windows if ppl else None,
        "lm_eval_s_per_document": tasks.seconds / tasks.documents if tasks and tasks.documents else None,
        "wall_s": time.perf_counter() - started,
    }
    if route.per_request:
        decisions = max(route.decisions, 1)
        speed_block.update(controller_s_total=route.controller_s,
                           controller_s_per_decision=route.controller_s / decisions,
                           controller_overhead=route.controller_s / max(route.controller_s + route.model_s, 1e-12))
    return {
        "kind": route.spec.kind,
        "action": route.spec.action.label if route.spec.kind == "static" else None,
        "checkpoint": route.spec.checkpoint,
        "wikitext": asdict(ppl) if ppl else None,
        "tasks": {name: asdict(score) for name, score in tasks.tasks.items()} if tasks else {},
        "lm_eval_seconds": tasks.seconds if tasks else None,
        "lm_eval_files": ([str(Path(output_dir.parent.name) / output_dir.name / f) for f in tasks.files]
                          if tasks and tasks.files else None),     # relative to the run folder
        "speed": speed_block,
        "actions": scored_actions if route.per_request else {route.spec.action.label: requests},
    }


def format_table(block: dict) -> str:
    """Markdown table of the block: one row per model (PPL, task accuracies, tokens/s, memory, actions)."""
    models = block["models"]
    tasks = sorted({task for entry in models.values() for task in entry["tasks"]})
    metric = {task: "acc_norm" if any(e["tasks"].get(task, {}).get("acc_norm") is not None for e in models.values())
              else "acc" for task in tasks}   # acc_norm where the task has it (ARC, HellaSwag), else acc
    header = ["model", "wikitext ppl", *(f"{t} {metric[t]}" for t in tasks), "prefill tok/s", "decode tok/s",
              "peak RSS MB", "actions"]
    rows = []
    for label, entry in models.items():
        speed = entry["speed"]
        accs = [fmt(entry["tasks"].get(task, {}).get(metric[task]), 4) for task in tasks]
        actions = ", ".join(f"{k}×{v}" for k, v in sorted(entry["actions"].items(), key=lambda kv: -kv[1]))
        rows.append([label, fmt(entry["wikitext"]["ppl"] if entry["wikitext"] else None, 3), *accs,
                     fmt(speed.get("prefill_tokens_per_s"), 1), fmt(speed.get("decode_tokens_per_s"), 1),
                     fmt(speed.get("peak_rss_mb"), 0), actions])
    return "\n".join(md_table(header, rows))


__all__ = ["EvalConfig", "EvaluationError", "evaluate_route", "format_table", "run_evaluation"]
