"""--log-to tensorboard: the episodes, rewards and losses of a training run, and the heal KL, as event files that
TensorBoard's own reader gives back with the values metrics.json holds."""
from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import adaptive_pruning
from reporting.tracking import EVENTS_DIR, TensorBoardTracker, check_tracker, log_heal_step, log_heal_validation
from tests.test_cli import TINY_TRAIN


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_episodes_reach_tensorboard_with_metrics_values(tmp_path):
    assert adaptive_pruning.main(["--mode", "train", "--episodes", "4", "--save-every", "2", "--log-to", "tensorboard",
                                  "--checkpoint", str(tmp_path / "p.pt"), "--report-dir", str(tmp_path / "r"),
                                  *TINY_TRAIN]) == 0
    run = next((tmp_path / "r").glob("train-*"))
    logged = scalars(run / EVENTS_DIR)
    episodes = json.loads((run / "metrics.json").read_text())["episodes"]
    assert [step for step, _ in logged["train/reward"]] == [e["episode"] for e in episodes]   # each once
    assert [v for _, v in logged["train/reward"]] == pytest.approx([e["outcome"]["reward"] for e in episodes])
    assert [v for _, v in logged["train/action"]] == [e["action_index"] for e in episodes]
    assert {"train/epsilon", "train/speedup", "train/kl"} <= set(logged)
    learned = [e["episode"] for e in episodes if e["loss"] is not None]     # no loss before the first batch
    assert [step for step, _ in logged.get("train/loss", [])] == learned


def test_heal_records_become_kl_curves_per_action(tmp_path):
    with TensorBoardTracker(tmp_path) as tracker:
        for step, kl in enumerate([0.5, 0.25]):
            log_heal_step(tracker, {"step": step, "kl": kl, "members": {"none": 0.0, "ffn_neurons:0.5": 2 * kl}})
        log_heal_validation(tracker, {"step": 2, "held_out": {"ffn_neurons:0.5": 0.3}, "train": {"ffn_neurons:0.5": 0.2}})
    logged = scalars(tmp_path)
    assert logged["heal/kl"] == [(0, 0.5), (1, 0.25)]
    assert logged["heal/kl/ffn_neurons:0.5"] == [(0, 1.0), (1, 0.5)]
    assert logged["heal/held_out_kl/ffn_neurons:0.5"] == [(2, pytest.approx(0.3))]
    assert logged["heal/train_window_kl/ffn_neurons:0.5"] == [(2, pytest.approx(0.2))]


def test_an_unknown_tracker_is_one_line_naming_the_flag(capsys):
    with pytest.raises(ValueError, match="--log-to wandb: choose from none, tensorboard"):
        check_tracker("wandb")
    assert adaptive_pruning.main(["--mode", "test", "--log-to", "tensorboard"]) == 2     # not a test-mode flag
    assert "--log-to has no effect in --mode test" in capsys.readouterr().err
