"""--mode test: a saved policy against every static action and the oracle on held-out prompts."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

from common.config import RunConfig, uses_probe
from common.data import load_prompts
from controller import checkpointing
from machine.contention import contention, parse_scenarios
from environments.records import to_jsonable
from controller.router import agent_from_checkpoint
from environments.session import open_session, with_trained_engine
from environments.state import state_vector
from controller.arms import FittedArms
from controller.study import POLICY, arms, lookahead_arms
from environments.precomputed import OfflineEnvironment, build_offline_data, cached_probe_outcomes, evaluate_offline
from controller.trainer import evaluate_prompts, greedy_chooser, load_trace, train_prompts
from modes.flags import check_environment, flags_of
from modes.validate import check_checkpoint_fits, naming
from modes.outputs import (finish_run, load_check, load_table, metrics_skeleton, offline_record,
                           table_load_check)
from reporting import provenance
from reporting import render as reporting
from reporting.summaries import ALL, best_static, summarize_offline

log = logging.getLogger(__name__)


def config_from_checkpoint(cfg: RunConfig, payload: dict, explicit: set[str]) -> RunConfig:
    """Test with the settings the policy was trained under, unless the user set them explicitly (the engine's:
    ``EngineConfig.from_stored``, via ``with_trained_engine``)."""
    trained = payload["config"]
    keep = {"model", "targets", "intensities", "ablation", "nlp_backend", "train_dataset",
            "seed", "test_fraction", "scenarios", "environment", "state_features", "train_samples"}
    updates = {k: (tuple(v) if isinstance(v, list) else v) for k, v in trained.items()
               if k in keep and k not in explicit}
    reward = dataclasses.replace(cfg.reward, **{k: v for k, v in trained["reward"].items()
                                                if f"reward.{k}" not in explicit})
    env = dataclasses.replace(cfg.env, **{k: v for k, v in trained["env"].items() if f"env.{k}" not in explicit})
    offline = dataclasses.replace(cfg.offline, **{k: v for k, v in trained.get("offline", {}).items()
                                                  if f"offline.{k}" not in explicit})
    if "environment" not in trained and "environment" not in explicit:
        updates["environment"] = "live"     # checkpoints written before the offline environment
    return with_trained_engine(dataclasses.replace(cfg, **updates, reward=reward, env=env, offline=offline),
                               trained, explicit)


def run_test(cfg: RunConfig, explicit: set[str] = frozenset(), test_scenarios: str | None = None,
             eval_cfg=None, ablation_checkpoints: Sequence[str] = ()) -> Path:
    """Policy vs every static action vs the oracle on held-out prompts, per scenario.

    With `eval_cfg` (--lm-eval) the dense model, the best static pruning action and the policy are
    also evaluated on WikiText-2 and the lm-eval tasks. `ablation_checkpoints` are further policies
    (trained with --ablation) that decide on the same observations, paired with the main policy.
    """
    with naming("--checkpoint"):
        payload = checkpointing.load_checkpoint(Path(cfg.checkpoint))
    with naming("--ablation-checkpoints"):
        others = {path: checkpointing.load_checkpoint(Path(path)) for path in ablation_checkpoints}
    cfg = config_from_checkpoint(cfg, payload, explicit)
    check_environment(flags_of(explicit), cfg.environment)
    check_checkpoint_fits(cfg, payload)     # before the model loads: --targets must not relabel the policy's outputs
    for path, other in others.items():
        check_checkpoint_fits(dataclasses.replace(cfg, checkpoint=path, state_features=other["config"].get(
            "state_features", cfg.state_features)), other, flag="--ablation-checkpoints")
    if cfg.environment == "offline":
        return run_test_offline(cfg, payload, others, test_scenarios, eval_cfg)
    prompts = test_prompts(cfg)
    with open_session(cfg) as s:
        cfg = s.cfg
        agent, _ = agent_from_checkpoint(payload, s.loaded.name)
        labels = [a.label for a in s.actions]
        choosers = ablation_choosers(others, s.loaded.name, labels, s.analyzer.backend)
        s.env.set_calibration_prompts([p.text for p in prompts])
        s.analyzer.analyze_batch([p.text for p in prompts], tokenizer=s.loaded.tokenizer, progress=True)
        run_dir = reporting.RunDir.create(Path(cfg.report_dir), "test", s.loaded.name)
        run_dir.write_config({**cfg.to_dict(), "ablation_checkpoints": list(ablation_checkpoints)})
        scenarios = parse_scenarios(test_scenarios or cfg.scenarios)
        prov = provenance.collect(seed=cfg.seed, model=s.loaded, device=str(s.env.device),
                                  scenario=",".join(sc.name for sc in scenarios), nlp_backend=s.analyzer.backend,
                                  engine=s.engine.describe(s.actions))
        results: list = []
        ablations: dict[str, list] = {name: [] for name in choosers}
        if cfg.latency_table:
            s.env.table = load_table(cfg.latency_table)
        else:
            s.env.calibrate("idle", s.actions)
        trace = (load_trace(cfg.telemetry_trace, sum(f.startswith("hw.") for f in payload["state_features"]))
                 if cfg.telemetry_trace else None)
        for scenario in scenarios:
            replay = trace is not None and s.env.table.has(scenario.name)   # nothing depends on the live load
            with contextlib.nullcontext() if replay else contention(scenario):
                if not s.env.table.has(scenario.name):
                    s.env.calibrate(scenario.name, s.actions)
                main, other = evaluate_prompts(s, prompts, scenario.name, greedy_chooser(agent), choosers,
                                               trace=trace)
                results += main
                for name, rows in other.items():
                    ablations[name] += rows
                partial = metrics_skeleton("test", cfg, prov, labels, prompts=to_jsonable(results))
                partial.update(partial=True, partial_reason="test still running")
                run_dir.write_metrics(partial)
        rows = to_jsonable(results)
        extra = {"ablations": to_jsonable(ablations)} if ablations else {}
        if eval_cfg is not None:
            from evaluation.suite import LM_EVAL_DIR, run_evaluation
            # the report's best static over all test prompts, pruned: dense is scored beside it anyway
            specs = ["dense", f"static:{best_static(rows, pruning_only=True)}", f"policy:{cfg.checkpoint}"]
            extra["evaluation"] = run_evaluation(s.loaded, specs, eval_cfg, engine=s.engine,
                                                 output_dir=run_dir.path / LM_EVAL_DIR)
        metrics = metrics_skeleton("test", cfg, prov, labels, prompts=rows, checkpoint=str(cfg.checkpoint),
                                   latency_table=s.env.table.to_dict(),
                                   load_verification=table_load_check(s.env.table, scenarios), **extra)
        return finish_run(run_dir, metrics)


def ablation_choosers(payloads: dict[str, dict], model_id: str, labels: list[str],
                      backend: str) -> dict[str, Callable]:
    """name -> chooser of an Observation, one per ablation checkpoint (named by its --ablation)."""
    choosers: dict[str, Callable] = {}
    for path, payload in payloads.items():
        other, actions = agent_from_checkpoint(payload, model_id)
        if [a.label for a in actions] != labels:
            raise ValueError(f"--ablation-checkpoints {path} was trained on another action space "
                             f"({len(actions)} actions vs {len(labels)}): train it with the same --targets/--intensities")
        trained_backend = payload["config"].get("nlp_backend", "auto")
        if trained_backend not in ("auto", backend):
            raise ValueError(f"--ablation-checkpoints {path} saw {trained_backend} prompt features, the policy "
                             f"{backend}: train both with the same --nlp-backend")
        ablation = payload["config"].get("ablation", "none")
        name = ablation if ablation != "none" and ablation not in choosers else Path(path).stem
        choosers[name] = (lambda obs, choose=greedy_chooser(other), ablation=ablation:
                          choose(state_vector(obs.hardware, obs.features, ablation)))
    return choosers


def test_prompts(cfg: RunConfig) -> list:
    """--test-dataset, or the held-out split of the training data set (never a training prompt)."""
    if cfg.test_dataset and cfg.test_dataset != cfg.train_dataset:
        with naming("--test-dataset"):
            prompt_set = load_prompts(cfg.test_dataset, seed=cfg.seed)
    else:
        with naming("--train-dataset"):
            prompt_set = load_prompts(cfg.train_dataset, seed=cfg.seed).split(cfg.test_fraction, seed=cfg.seed)[1]
    return list(prompt_set.take(cfg.test_samples).prompts)


def seed_agents(payload: dict, model_id: str) -> list:
    """The agents of every training seed of an offline checkpoint (the checkpoint itself first)."""
    paths = payload.get("seed_checkpoints") or []
    extra = [checkpointing.load_checkpoint(Path(p)) for p in paths[1:]]
    return [agent_from_checkpoint(p, model_id)[0] for p in [payload, *extra]]


def run_test_offline(cfg: RunConfig, payload: dict, others: dict[str, dict], test_scenarios: str | None,
                     eval_cfg=None) -> Path:
    """Policy (every seed), ablations and the fitted arms on the held-out prompts x the test calibrations.

    Apart from the live path because every arm is scored on the same looked-up cells (paired exactly).

    The arms come from the checkpoint, fitted at training time on the training split; this
    reads the test prompts' outcomes and the test calibrations only. With `eval_cfg` (--lm-eval) dense,
    the best pruned static action of the pooled test and the policy are also evaluated, as live tests do.
    """
    fitted_arms = payload.get("arms") or payload.get("baselines")     # "baselines": checkpoints before the arm registry
    if not fitted_arms:
        raise ValueError(f"--checkpoint {cfg.checkpoint} was not trained offline (no fitted arms): "
                         "test it with --environment live, or train it with --environment offline")
    given = {o["config"].get("ablation", "none") for o in others.values()}
    for path in payload.get("ablation_checkpoints") or []:       # trained beside the policy (no_prompt)
        other = checkpointing.load_checkpoint(Path(path))
        if other["config"].get("ablation", "none") not in given:   # an --ablation-checkpoints one wins
            others = {**others, path: other}
    prompts = test_prompts(cfg)
    calibration = train_prompts(cfg.train_dataset, cfg.seed, cfg.test_fraction, cfg.train_samples)
    with open_session(cfg) as s:
        cfg = s.cfg
        labels, model_id = [a.label for a in s.actions], s.loaded.name
        scenarios = parse_scenarios(cfg.scenarios)
        prov = provenance.collect(seed=cfg.seed, model=s.loaded, device=str(s.env.device),
                                  scenario=test_scenarios or cfg.scenarios, nlp_backend=s.analyzer.backend,
                                  engine=s.engine.describe(s.actions))
        run_dir = reporting.RunDir.create(Path(cfg.report_dir), "test", s.loaded.name)
        run_dir.write_config({**cfg.to_dict(), "ablation_checkpoints": list(others)})
        data = build_offline_data(s, prompts, calibration, scenarios)
        levels = [sc.name for sc in parse_scenarios(test_scenarios)] if test_scenarios else None
        env = OfflineEnvironment(data, [p.id for p in prompts], "test", labels, cfg.reward,
                                 cfg.env.long_prompt_tokens, cfg.state_features, levels=levels,
                                 lookahead_tokens=cfg.offline.lookahead_tokens)
        names = env.state_names   # the probe part: known from the data now
        for path, checked in [(cfg.checkpoint, payload), *others.items()]:
            with naming("--checkpoint" if path == cfg.checkpoint else "--ablation-checkpoints"):
                checkpointing.check_compatible(checked, model_id=model_id, action_space=labels, state_features=names)
        fitted = FittedArms.from_dict(fitted_arms)
        if env.constrained:     # every arm is scored on the Lagrangian reward the arms were fitted at
            env.set_multiplier(fitted.multiplier)
        policies = {POLICY: (seed_agents(payload, model_id), cfg.ablation)}
        for path, other in others.items():
            ablation = other["config"].get("ablation", "none")
            name = ablation if ablation != "none" and ablation not in policies else Path(path).stem
            policies[name] = (seed_agents(other, model_id), ablation)
        result = evaluate_offline(env, arms(env, policies, fitted), cfg.offline.telemetry_draws, cfg.seed,
                                  lookahead_arms(policies))
        offline = offline_record(data, fitted)
        if uses_probe(cfg.state_features):     # the training prompts' side of the in-study headroom report
            offline["headroom_train"] = cached_probe_outcomes(s, calibration)
        extra = {}
        if eval_cfg is not None:
            from evaluation.suite import LM_EVAL_DIR, run_evaluation
            pooled = summarize_offline(result)["by_level"][env.levels[-1] if len(env.levels) == 1 else ALL]["arms"]
            best = max((a for a in labels if a != "none"), key=lambda a: pooled[a]["reward"]["mean"])
            specs = ["dense", f"static:{best}", f"policy:{cfg.checkpoint}"]
            extra["evaluation"] = run_evaluation(s.loaded, specs, eval_cfg, engine=s.engine,
                                                 output_dir=run_dir.path / LM_EVAL_DIR)
    metrics = metrics_skeleton("test", cfg, prov, labels, checkpoint=str(cfg.checkpoint), offline_test=result,
                               offline=offline, load_verification=load_check(data), **extra)
    return finish_run(run_dir, metrics)
