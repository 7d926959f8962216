"""--mode train: learn a policy on training prompts under the configured contention scenarios."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from common.config import RunConfig
from controller.records import to_jsonable
from controller.session import open_session
from common.signals import sigterm_as_interrupt
from controller.trainer import Trainer, train_prompts
from modes.outputs import finish_run, metrics_skeleton, load_table
from reporting import provenance
from reporting import render as reporting

log = logging.getLogger(__name__)


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
            metrics = metrics_skeleton("train", cfg, prov, labels, episodes=to_jsonable(episodes),
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
        finish_run(run_dir, metrics)
        print(f"checkpoint: {cfg.checkpoint}")
        if not completed:
            raise KeyboardInterrupt
        return run_dir.path
