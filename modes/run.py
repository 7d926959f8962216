"""What each CLI mode does, as functions a test can call without argv."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

from controller import checkpointing
from reporting import provenance
from reporting import render as reporting
from common.data import load_prompts
from controller.latency_table import LatencyTable
from pruners import PruningAction, PruningEngine
from controller.records import SCHEMA_VERSION, to_jsonable
from controller.router import agent_from_checkpoint
from common.config import RunConfig
from controller.contention import contention, parse_scenarios
from controller.session import action_space, open_session
from controller.state import state_vector
from controller.trainer import Trainer, evaluate_prompts, greedy_chooser, load_trace, sigterm_as_interrupt, train_prompts

log = logging.getLogger(__name__)


def _metrics(kind: str, cfg: RunConfig, prov: dict, action_space: list[str], **parts) -> dict:
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "partial": False, "partial_reason": None,
            "provenance": prov, "config": cfg.to_dict(),
            "action_space": action_space, **parts}


def _finish(run_dir, metrics: dict) -> Path:
    run_dir.write_metrics(metrics)
    path = reporting.render(run_dir.path)
    print(reporting.console_summary(metrics))
    print(f"report: {path}")
    return run_dir.path


def load_table(path: str) -> LatencyTable:
    """A train run's latency_table.json, or any run's metrics.json (its table), for reproducible rewards.

    A test run's table lets a second policy (an ablation) be tested on exactly the same timings.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--latency-table {path} not found: pass the latency_table.json or "
                                "metrics.json of an earlier run")
    try:
        data = json.loads(file.read_text())
        return LatencyTable.from_dict(data.get("latency_table", data))
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"--latency-table {path} is not a latency table ({err})") from err


def run_train(cfg: RunConfig) -> Path:
    prompts = train_prompts(cfg.train_dataset, cfg.seed, cfg.test_fraction, cfg.train_samples)
    texts = [p.text for p in prompts]
    with sigterm_as_interrupt(), open_session(cfg) as s:
        cfg = s.cfg            # with the prompt-analysis backend resolved
        prov = provenance.collect(seed=cfg.seed, model=s.loaded, device=str(s.env.device),
                                  scenario=cfg.scenarios, nlp_backend=s.analyzer.backend)
        labels = [a.label for a in s.actions]
        trainer = Trainer(s, prompts, prov)
        run_dir = reporting.RunDir.create(Path(cfg.report_dir), "train", s.loaded.name)

        def write(episodes, partial=False, reason=None):
            metrics = _metrics("train", cfg, prov, labels, episodes=to_jsonable(episodes),
                               latency_table=s.env.table.to_dict())
            metrics.update(partial=partial, partial_reason=reason)
            run_dir.write_metrics(metrics)
            return metrics

        completed = False
        try:   # from here on an interrupt always leaves a checkpoint and a partial report
            run_dir.write_config(cfg.to_dict())
            if cfg.resume:
                trainer.resume()
            elif cfg.latency_table:
                s.env.table = load_table(cfg.latency_table)
            s.env.set_calibration_prompts(texts[:64])
            s.analyzer.analyze_batch(texts, tokenizer=s.loaded.tokenizer, progress=True)   # fills the feature cache
            trainer.run(write)
            completed = True
        except KeyboardInterrupt as err:
            log.warning("interrupted (%s) after episode %d: saving checkpoint and partial report",
                        err, trainer.next_episode)
            s.engine.restore()
            trainer.save(trainer.next_episode)
        metrics = write(trainer.episodes, partial=not completed,
                        reason=None if completed else f"interrupted after episode {trainer.next_episode}; "
                                                      "continue with --resume")
        (run_dir.path / "latency_table.json").write_text(json.dumps(s.env.table.to_dict(), indent=1))
        _finish(run_dir, metrics)
        print(f"checkpoint: {cfg.checkpoint}")
        if not completed:
            raise KeyboardInterrupt
        return run_dir.path


def config_from_checkpoint(cfg: RunConfig, payload: dict, explicit: set[str]) -> RunConfig:
    """Test with the settings the policy was trained under, unless the user set them explicitly."""
    trained = payload["config"]
    keep = {"model", "targets", "intensities", "structural", "importance", "ablation", "nlp_backend", "train_dataset",
            "seed", "test_fraction", "scenarios"}
    updates = {k: (tuple(v) if isinstance(v, list) else v) for k, v in trained.items()
               if k in keep and k not in explicit}
    reward = dataclasses.replace(cfg.reward, **{k: v for k, v in trained["reward"].items()
                                                if f"reward.{k}" not in explicit})
    env = dataclasses.replace(cfg.env, **{k: v for k, v in trained["env"].items() if f"env.{k}" not in explicit})
    return dataclasses.replace(cfg, **updates, reward=reward, env=env)


def best_static(rows: list[dict], pruning_only: bool = False) -> str:
    """The static action with the highest mean reward over the test prompts (hindsight choice).

    ``pruning_only`` skips ``none``: the evaluation always shows one pruned static model beside
    dense and the policy, even when staying dense earned the most reward.
    """
    labels = [a for a in rows[0]["static"] if not (pruning_only and a == "none")]
    return max(labels, key=lambda a: sum(r["static"][a]["reward"] for r in rows) / len(rows))


def run_test(cfg: RunConfig, explicit: set[str] = frozenset(), test_scenarios: str | None = None,
             eval_cfg=None, ablation_checkpoints: Sequence[str] = ()) -> Path:
    """Policy vs every static action vs the oracle on held-out prompts, per scenario.

    With `eval_cfg` (--lm-eval) the dense model, the best static pruning action and the policy are
    also evaluated on WikiText-2 and the lm-eval tasks. `ablation_checkpoints` are further policies
    (trained with --ablation) that decide on the same observations, paired with the main policy.
    """
    payload = checkpointing.load_checkpoint(Path(cfg.checkpoint))
    others = {path: checkpointing.load_checkpoint(Path(path)) for path in ablation_checkpoints}
    cfg = config_from_checkpoint(cfg, payload, explicit)
    if cfg.test_dataset and cfg.test_dataset != cfg.train_dataset:
        prompt_set = load_prompts(cfg.test_dataset, seed=cfg.seed)
    else:   # the held-out split of the training data set: never a training prompt
        prompt_set = load_prompts(cfg.train_dataset, seed=cfg.seed).split(cfg.test_fraction, seed=cfg.seed)[1]
    prompts = list(prompt_set.take(cfg.test_samples).prompts)
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
                                  scenario=",".join(sc.name for sc in scenarios), nlp_backend=s.analyzer.backend)
        results: list = []
        ablations: dict[str, list] = {name: [] for name in choosers}
        if cfg.latency_table:
            s.env.table = load_table(cfg.latency_table)
        else:
            s.env.calibrate("idle", s.actions)
        trace = load_trace(cfg.telemetry_trace) if cfg.telemetry_trace else None
        for scenario in scenarios:
            replay = trace is not None and s.env.table.has(scenario.name)   # nothing depends on the live load
            with contextlib.nullcontext() if replay else contention(scenario):
                if scenario.loaded and not replay:
                    time.sleep(0.5)
                if not s.env.table.has(scenario.name):
                    s.env.calibrate(scenario.name, s.actions)
                main, other = evaluate_prompts(s, prompts, scenario.name, greedy_chooser(agent), choosers,
                                               trace=trace)
                results += main
                for name, rows in other.items():
                    ablations[name] += rows
                partial = _metrics("test", cfg, prov, labels, prompts=to_jsonable(results))
                partial.update(partial=True, partial_reason="test still running")
                run_dir.write_metrics(partial)
        rows = to_jsonable(results)
        extra = {"ablations": to_jsonable(ablations)} if ablations else {}
        if eval_cfg is not None:
            from evaluation.suite import run_evaluation
            specs = ["dense", f"static:{best_static(rows, pruning_only=True)}", f"policy:{cfg.checkpoint}"]
            extra["evaluation"] = run_evaluation(s.loaded, specs, eval_cfg, engine=s.engine)
        metrics = _metrics("test", cfg, prov, labels, prompts=rows, checkpoint=str(cfg.checkpoint),
                           latency_table=s.env.table.to_dict(), **extra)
        return _finish(run_dir, metrics)


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


def run_eval(cfg: RunConfig, eval_cfg, specs: str) -> Path:
    """WikiText-2 (and with --lm-eval, zero-shot tasks) for dense, static and policy-routed models."""
    from evaluation.routes import expand_static_all
    from evaluation.suite import run_evaluation
    from model_loader import load_model

    specs = expand_static_all(specs, action_space(cfg))

    loaded = load_model(cfg.model, device=cfg.device)
    engine = PruningEngine(loaded.model, mode="structural" if cfg.structural else "mask",
                           importance=cfg.importance, tokenizer=loaded.tokenizer,
                           kv_min_tokens=cfg.env.long_prompt_tokens)
    run_dir = reporting.RunDir.create(Path(cfg.report_dir), "eval", loaded.name)
    run_dir.write_config({**cfg.to_dict(), "eval": dataclasses.asdict(eval_cfg), "eval_models": specs})
    prov = provenance.collect(seed=cfg.seed, model=loaded, device=str(next(loaded.model.parameters()).device))
    with sigterm_as_interrupt():
        block = run_evaluation(loaded, specs, eval_cfg, engine=engine)
    metrics = _metrics("eval", cfg, prov, sorted(block["models"]), evaluation=block)
    return _finish(run_dir, metrics)


def run_baselines(cfg: RunConfig, bcfg) -> Path:
    """Static structured and unstructured baselines (and policy points) on one protocol."""
    from evaluation.baselines import run_baselines as sweep
    from model_loader import load_model

    loaded = load_model(cfg.model, device=cfg.device)
    run_dir = reporting.RunDir.create(Path(cfg.report_dir), "baselines", loaded.name)
    run_dir.write_config({**cfg.to_dict(), "baselines": dataclasses.asdict(bcfg)})
    prov = provenance.collect(seed=cfg.seed, model=loaded, device=str(next(loaded.model.parameters()).device))

    def write(rows, partial=True):
        metrics = _metrics("baselines", cfg, prov, [], baselines=rows, baseline_config=dataclasses.asdict(bcfg))
        metrics.update(partial=partial, partial_reason="run in progress" if partial else None)
        run_dir.write_metrics(metrics)
        return metrics

    with sigterm_as_interrupt():
        rows = sweep(loaded, bcfg, out_dir=run_dir.path, on_row=write)
    return _finish(run_dir, write(rows, partial=False))


def run_export(cfg: RunConfig, out_dir: str | None, action: str | None, baseline: str | None,
               calibration_dataset: str = "builtin", samples: int = 64) -> Path:
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
        path = export_baseline(loaded, baseline, Path(out_dir), calibration_texts(calibration_dataset, samples))
    else:
        from pruners.export import export_pruned
        engine = PruningEngine(loaded.model, importance=cfg.importance, tokenizer=loaded.tokenizer)
        path = export_pruned(loaded, engine, target, out_dir)
    print(f"exported: {path}")
    return path


def run_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    missing = [d for d in run_dirs if not (Path(d) / "metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no metrics.json in {', '.join(map(str, missing))}: pass a run folder under reports/")
    if len(run_dirs) == 1:
        path = reporting.render(Path(run_dirs[0]))
        print(reporting.console_summary(json.loads((Path(run_dirs[0]) / "metrics.json").read_text())))
        print(f"report: {path}")
        return path
    out = out_dir or Path(run_dirs[0]).parent / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    path = reporting.compare([Path(d) for d in run_dirs], out)
    print(f"comparison: {path}")
    return path
