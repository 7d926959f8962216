"""--mode train: learn a policy on training prompts under the configured contention scenarios."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from common.config import RunConfig
from common.files import atomic_write_text, strict_json
from environments.records import to_jsonable
from environments.session import open_session
from common.signals import RunInterrupted, interrupts_deferred, sigterm_as_interrupt
from controller import checkpointing
from machine.contention import parse_scenarios
from controller.dqn import linear_epsilon
from controller.trainer import train_offline
from environments.precomputed import OfflineEnvironment, build_offline_data
from controller.study import fit_offline_arms, side_ablations
from controller.trainer import Trainer, train_prompts
from modes.validate import check_checkpoint_fits, naming
from modes.outputs import (finish_run, load_check, load_table, metrics_skeleton, offline_record,
                           table_load_check)
from reporting import provenance
from reporting import render as reporting
from reporting.tracking import check_tracker, log_episodes, open_tracker

log = logging.getLogger(__name__)


def run_train(cfg: RunConfig) -> Path:
    check_tracker(cfg.log_to)
    if cfg.environment == "offline":
        return run_train_offline(cfg)
    if cfg.resume:   # the checkpoint must fit this run before the model loads and the engine calibrates
        with naming("--checkpoint"):
            payload = checkpointing.load_checkpoint(Path(cfg.checkpoint))
        check_checkpoint_fits(cfg, payload)
    with naming("--train-dataset"):
        prompts = train_prompts(cfg.train_dataset, cfg.seed, cfg.test_fraction, cfg.train_samples)
    texts = [p.text for p in prompts]
    with sigterm_as_interrupt(), open_session(cfg) as s:
        cfg = s.cfg            # with the prompt-analysis backend resolved
        prov = provenance.collect(seed=cfg.seed, model=s.loaded, device=str(s.env.device),
                                  scenario=cfg.scenarios, nlp_backend=s.analyzer.backend,
                                  engine=s.engine.describe(s.actions))
        labels = [a.label for a in s.actions]
        trainer = Trainer(s, prompts, prov)
        run_dir = reporting.RunDir.create(Path(cfg.report_dir), "train", s.loaded.name)
        tracker = open_tracker(cfg.log_to, run_dir.path)
        tracked = [0]       # episodes already sent to the tracker (each write sends the new ones)

        def write(episodes, partial=False, reason=None):
            metrics = metrics_skeleton("train", cfg, prov, labels, episodes=to_jsonable(episodes),
                               latency_table=s.env.table.to_dict())
            metrics.update(partial=partial, partial_reason=reason)
            run_dir.write_metrics(metrics)
            log_episodes(tracker, episodes[tracked[0]:])
            tracked[0] = len(episodes)
            return metrics

        completed = late = False
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
            with interrupts_deferred():    # a second signal waits until the checkpoint is complete
                s.engine.restore()
                trainer.save(trainer.next_episode)
            # every episode had run (the signal came while the run closed): its files are complete, not partial
            completed = late = trainer.next_episode >= cfg.episodes
        try:
            with interrupts_deferred():        # a second Ctrl-C waits until the files are complete
                metrics = write(trainer.episodes, partial=not completed,
                                reason=None if completed else f"interrupted after episode {trainer.next_episode}; "
                                                              "continue with --resume")
                atomic_write_text(run_dir.path / "latency_table.json", strict_json(s.env.table.to_dict(), indent=1))
                metrics["load_verification"] = table_load_check(s.env.table, parse_scenarios(cfg.scenarios))
                finish_run(run_dir, metrics)
                tracker.close()
                print(f"checkpoint: {cfg.checkpoint}")
        except KeyboardInterrupt:          # arrived while the files were written: they are complete
            late = True
        if not completed or late:
            raise RunInterrupted(f"checkpoint {cfg.checkpoint} after episode {trainer.next_episode} of {cfg.episodes}"
                                 f"{'' if completed else ' (continue with --resume)'} and the "
                                 f"{'' if completed else 'partial '}report in {run_dir.path}")
        return run_dir.path


def seed_checkpoints(checkpoint: str, seeds: list[int]) -> list[Path]:
    """The first seed's policy at --checkpoint, each further seed's beside it as NAME.seedN.pt."""
    path = Path(checkpoint)
    return [path] + [path.with_name(f"{path.stem}.seed{seed}{path.suffix}") for seed in seeds[1:]]


def run_train_offline(cfg: RunConfig) -> Path:
    """Precompute (or read) the outcomes and calibrations, fit the arms on them, train every seed.

    Apart from the live path because it trains several seeds and the fitted arms on one lookup table.

    Everything here reads the training prompts and the training calibrations only; the test split's
    calibrations are measured in the same interleaved rounds but never opened.
    """
    with naming("--train-dataset"):
        prompts = train_prompts(cfg.train_dataset, cfg.seed, cfg.test_fraction, cfg.train_samples)
    scenarios = parse_scenarios(cfg.scenarios)
    with sigterm_as_interrupt(), open_session(cfg) as s:
        cfg = s.cfg
        prov = provenance.collect(seed=cfg.seed, model=s.loaded, device=str(s.env.device),
                                  scenario=cfg.scenarios, nlp_backend=s.analyzer.backend,
                                  engine=s.engine.describe(s.actions))
        run_dir = reporting.RunDir.create(Path(cfg.report_dir), "train", s.loaded.name)
        run_dir.write_config(cfg.to_dict())
        data = build_offline_data(s, prompts, prompts, scenarios)
        labels, model_id = [a.label for a in s.actions], s.loaded.name
    env = OfflineEnvironment(data, [p.id for p in prompts], "train", labels, cfg.reward, cfg.env.long_prompt_tokens,
                             cfg.state_features, cfg.ablation, lookahead_tokens=cfg.offline.lookahead_tokens)
    names = env.state_names
    seeds = [cfg.seed + i for i in range(cfg.offline.seeds)]
    paths = seed_checkpoints(cfg.checkpoint, seeds)
    runs = []
    with open_tracker(cfg.log_to, run_dir.path) as tracker:
        for seed in seeds:
            started = time.perf_counter()
            runs.append(train_offline(env, cfg.dqn, cfg.episodes, seed))
            log.info("seed %d: %d episodes in %.1f s", seed, cfg.episodes, time.perf_counter() - started)
            log_episodes(tracker, runs[-1][1], prefix=f"seed{seed}/")
    fitted = fit_offline_arms(env, names, cfg.offline.telemetry_draws, cfg.seed, [m for _, _, m in runs])
    histories = [episodes for _, episodes, _ in runs]
    # The no-prompt ablation on the same data and seeds (seconds offline): test mode scores it beside the
    # policy, and its gap at idle is what the prompt features alone add.
    side = {}
    for ablation in side_ablations(cfg.ablation):
        base = Path(cfg.checkpoint)
        side[ablation] = (seed_checkpoints(str(base.with_name(f"{base.stem}.{ablation}{base.suffix}")), seeds),
                          [train_offline(env.with_ablation(ablation), cfg.dqn, cfg.episodes, seed) for seed in seeds])

    def save(seed_paths: list[Path], seed_runs: list, ablation: str, **extra) -> None:
        for seed, path, (agent, _, multiplier) in zip(seeds, seed_paths, seed_runs):
            checkpointing.save_checkpoint(path, {
                "model_id": model_id, "action_space": labels, "state_features": names,
                "config": dataclasses.replace(cfg, seed=seed, ablation=ablation,
                                              dqn=dataclasses.replace(cfg.dqn, seed=seed)).to_dict(),
                "agent": agent.state_dict(include_buffer=cfg.save_buffer), "next_episode": cfg.episodes,
                "epsilon": linear_epsilon(cfg.dqn, cfg.episodes, cfg.episodes), "environment": "offline",
                "arms": fitted.to_dict(), "seed_checkpoints": [str(p) for p in seed_paths],
                "multiplier": multiplier, "code_version": (prov.get("git") or {}).get("commit"),
                "dataset": cfg.train_dataset, "seed": seed, "test_fraction": cfg.test_fraction, **extra})

    save(paths, runs, cfg.ablation, ablation_checkpoints=[str(side_paths[0]) for side_paths, _ in side.values()])
    for ablation, (side_paths, side_runs) in side.items():
        save(side_paths, side_runs, ablation)
    metrics = metrics_skeleton("train", cfg, prov, labels, episodes=to_jsonable(histories[0]),
                               offline=offline_record(data, fitted, seeds, histories, paths),
                               load_verification=load_check(data))
    finish_run(run_dir, metrics)
    print(f"checkpoints: {', '.join(map(str, paths))}")
    for ablation, (side_paths, _) in side.items():
        print(f"{ablation} ablation (tested beside the policy): {', '.join(map(str, side_paths))}")
    return run_dir.path
