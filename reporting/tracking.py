"""Scalars that leave the tool as they are produced: ``--log-to tensorboard``.

Why TensorBoard: it writes local event files (no account, no server, nothing to sync), which is what works on
an offline machine; torch ships its writer (``torch.utils.tensorboard``), the ``tensorboard`` package reads the
files (``tensorboard --logdir reports/``), and W&B (``wandb sync``), MLflow and Aim import them. The tags:

- ``train/reward``, ``train/loss``, ``train/epsilon``, ``train/action``, ``train/speedup``, ``train/ppl_ratio``,
  ``train/kl`` per training episode (offline: one run per seed, ``seed<N>/train/...``);
- ``heal/kl`` (the members' mean KL to the dense teacher) and ``heal/kl/<action>`` per heal step;
  ``heal/held_out_kl/<action>`` and ``heal/train_window_kl/<action>`` at each validation.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

TRACKERS = ("none", "tensorboard")
EVENTS_DIR = "tensorboard"


class Tracker:
    """``--log-to none``: records nothing (the interface every tracker has)."""

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    """Event files in ``folder`` (one run per folder, so runs compare side by side in TensorBoard)."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder))
        log.info("TensorBoard event files: %s (view with `tensorboard --logdir %s`)", self.folder, self.folder.parent)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is not None and math.isfinite(value):     # TensorBoard has no 'missing'; skip, never fake
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.close()


def check_tracker(kind: str) -> str:
    if kind not in TRACKERS:
        raise ValueError(f"--log-to {kind}: choose from {', '.join(TRACKERS)}")
    if kind == "tensorboard" and importlib.util.find_spec("tensorboard") is None:    # torch's SummaryWriter needs it
        raise ValueError("--log-to tensorboard needs the tensorboard package: pip install -r requirements.txt")
    return kind


def open_tracker(kind: str, folder: Path) -> Tracker:
    """The tracker ``--log-to`` names, writing under ``folder / EVENTS_DIR``."""
    return TensorBoardTracker(Path(folder) / EVENTS_DIR) if check_tracker(kind) == "tensorboard" else Tracker()


def log_episodes(tracker: Tracker, episodes: Iterable, prefix: str = "") -> None:
    """Each training EpisodeRecord's reward, loss, exploration and outcome, at its episode number."""
    for e in episodes:
        out = e.outcome
        values = {"reward": out.reward if out else None, "loss": e.loss, "epsilon": e.epsilon,
                  "action": e.action_index, "speedup": out.speedup if out else None,
                  "ppl_ratio": out.ppl_ratio if out else None, "kl": out.kl if out else None}
        for name, value in values.items():
            tracker.scalar(f"{prefix}train/{name}", value, e.episode)


def log_heal_step(tracker: Tracker, record: dict) -> None:
    """One heal step (``pruners.recovery.healing.Healer.step``'s record): the mean KL and each member's."""
    step = record["step"]
    tracker.scalar("heal/kl", record["kl"], step)
    for label, kl in record["members"].items():
        tracker.scalar(f"heal/kl/{label}", kl, step)


def log_heal_validation(tracker: Tracker, record: dict) -> None:
    """One validation (``Healer.validate``): every action's KL on held-out and on training windows."""
    for name, tag in (("held_out", "held_out_kl"), ("train", "train_window_kl")):
        for label, kl in record[name].items():
            tracker.scalar(f"heal/{tag}/{label}", kl, record["step"])
