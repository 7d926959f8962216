"""--mode heal: nested healing of the run's sub-networks (pruners.recovery.healing), saved as a loadable model folder.

The folder (``--heal-out``, default ``.cache/heal/<model>``) is an ordinary ``save_pretrained`` model with its
units in importance order (stock transformers loads it as the healed dense model) plus ``elastic.pt`` (order,
plans, compensation) and ``heal.json`` (provenance, tokens, wall time, KL); ``--model DIR`` then serves the
healed actions in every mode. The checkpoint (``heal-checkpoint.pt`` inside the folder) is written every
``--heal-save-every`` steps and on interrupt; ``--resume`` continues from it; it is removed once the folder is saved.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
from pathlib import Path

from common import hub
from common.config import RunConfig
from common.signals import RunInterrupted, interrupts_deferred, sigterm_as_interrupt

log = logging.getLogger(__name__)


def heal_folder(cfg: RunConfig) -> Path:
    if cfg.heal.out_dir:
        return Path(cfg.heal.out_dir).expanduser()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(cfg.model).name if Path(cfg.model).exists() else cfg.model).strip("-")
    return hub.cache_dir() / "heal" / name.lower()


def run_heal(cfg: RunConfig, progress: bool = True) -> Path:
    """Heal ``cfg.model``'s sub-networks for ``cfg``'s action space (weight actions) and save the folder."""
    import torch

    from environments.session import action_space, build_engine
    from model_loader import load_model
    from pruners.recovery.healing import CHECKPOINT, Healer, heal_corpora, kl_summary, save_healed
    from reporting import provenance
    from reporting.tracking import log_heal_step, log_heal_validation, open_tracker

    check_heal(cfg)
    folder = heal_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, device=cfg.device, dtype=torch.float32)   # trained in float32 everywhere
    teacher = copy.deepcopy(loaded.model)
    actions = action_space(cfg)
    engine = build_engine(dataclasses.replace(cfg, structural=True), loaded, actions)
    windows, corpus, held_out, held_out_corpus = heal_corpora(folder, teacher, loaded.tokenizer, cfg.heal, cfg.seed,
                                                              progress)
    healer = Healer(engine, teacher, cfg.heal, actions, windows, seed=cfg.seed, checkpoint=folder / CHECKPOINT,
                    held_out=held_out)
    with sigterm_as_interrupt(), open_tracker(cfg.log_to, folder) as tracker:
        try:
            if cfg.resume:
                healer.resume()
            elif healer.checkpoint.is_file():
                log.warning("%s exists: starting over (pass --resume to continue it)", healer.checkpoint)
            log.info("healing %s: %d steps x %d x %d tokens, members: full + smallest + %d random of %d actions "
                     "(%s, %d torch threads)", loaded.name, cfg.heal.steps, cfg.heal.batch, cfg.heal.seq_len,
                     cfg.heal.random_actions, len(healer.actions) - 1, next(loaded.model.parameters()).device,
                     torch.get_num_threads())
            state = healer.run(progress, on_step=lambda r: log_heal_step(tracker, r),
                               on_validation=lambda r: log_heal_validation(tracker, r))
        except KeyboardInterrupt:
            log.warning("interrupted at step %d: saving the heal checkpoint (continue with --resume)",
                        healer.state.step)
            with interrupts_deferred():
                healer.save_checkpoint()
            raise RunInterrupted(f"heal checkpoint {healer.checkpoint} at step {healer.state.step} "
                                 "(continue with --resume)") from None
    prov = provenance.collect(seed=cfg.seed, model=loaded, device=str(next(loaded.model.parameters()).device),
                              engine=engine.describe(healer.actions))
    info = {"base_model": loaded.name, "base_source": loaded.source, "completed": True, "corpus": corpus,
            "held_out_corpus": held_out_corpus,
            "engine": {k: cfg.to_dict()[k] for k in ("importance", "allocation", "recovery", "calibration")},
            "actions": [a.label for a in healer.actions], "torch_threads": torch.get_num_threads(), "provenance": prov}
    menu = healer.menu(info)
    engine.restore()
    loaded.model.requires_grad_(False)
    save_healed(loaded.model, loaded.tokenizer, menu, folder)
    healer.checkpoint.unlink(missing_ok=True)
    print(f"healed: {folder} ({state.step} steps, {state.tokens} tokens in {state.wall_s:.0f} s, "
          f"{state.tokens / max(state.wall_s, 1e-9):.0f} tokens/s; mean KL first {menu.info['kl_first']['kl']:.4f} "
          f"-> last {menu.info['kl_last']['kl']:.4f})" if state.history else f"healed: {folder} (0 steps)")
    if state.validation:
        first, last = state.validation[0], state.validation[-1]
        print(f"held-out KL (nats/token; {held_out_corpus['tokens']} tokens never trained on): step {first['step']} "
              f"{kl_summary(first['held_out'])} -> step {last['step']} {kl_summary(last['held_out'])}; "
              f"training windows {kl_summary(first['train'])} -> {kl_summary(last['train'])}")
    print(f"use it with: --model {folder}")
    return folder


def check_heal(cfg: RunConfig) -> None:
    """Cheap checks before the model loads (value ranges: common.config LIMITS, checked by the CLI)."""
    from reporting.tracking import check_tracker
    check_tracker(cfg.log_to)
    from common.calibration import check_not_evaluation_data
    for spec in (s.strip() for s in cfg.heal.dataset.split(",") if s.strip()):
        check_not_evaluation_data(spec)
