"""The default live training path, and interrupts of it: each one resumable or truthfully reported.

The 30-try interrupt study is bench/interrupts.py (minutes); here a handful of random-time signals, bounded.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import adaptive_pruning
from common.config import RunConfig
from common.files import clean_orphaned_temp_files
from controller.checkpointing import load_checkpoint
from machine.load_signals import LoadAwareHardware
from machine.telemetry import HardwareState

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-new-tokens", "8", "--calibration-tokens", "4", "--calibration-repeats", "1", "--scenarios", "idle",
        "--train-samples", "40", "--telemetry-hz", "20"]


def measured_choice():
    """A thread rule as a measured OpenMP policy has one: the governor then reads the machine state per decision
    (the tests' fixed 'passive' policy has none, which is how the default live run's crash went unseen)."""
    from runtime import openmp
    return openmp.OpenMPChoice(policy="passive", threads_idle=1, threads_busy=1, source="measured", machine="test")


def test_governor_reads_a_contention_state_observation():
    from runtime.governor import ExecutionGovernor
    reading = HardwareState(timestamp=time.time(), cpu_count=2, cpu_percent=90.0, process_cpu_percent=10.0,
                            load_avg_1m=None, ram_total=1, ram_available=1, ram_used=0, swap_total=0, swap_used=0,
                            battery_percent=None, power_plugged=None)
    governor = ExecutionGovernor(choice=measured_choice())
    assert governor.machine_state(LoadAwareHardware(reading, slowdown=1.3)) == governor.machine_state(reading)


def test_default_live_training_runs_with_default_state_features(tmp_path, monkeypatch):
    """`--mode train --model tiny --environment live --train-dataset builtin` with the default --state-features
    (contention) under a measured thread rule: it crashed at episode 1 on LoadAwareHardware.cpu_percent."""
    from runtime import governor
    monkeypatch.setattr(governor.openmp, "active", measured_choice)
    checkpoint = tmp_path / "policy.pt"
    code = adaptive_pruning.main(["--mode", "train", "--model", "tiny", "--environment", "live", "--train-dataset",
                                  "builtin", "--episodes", "3", "--checkpoint", str(checkpoint), "--report-dir",
                                  str(tmp_path / "reports"), *FAST])
    assert code == 0
    payload = load_checkpoint(checkpoint)
    assert payload["config"]["state_features"] == RunConfig().state_features == "contention"
    assert payload["next_episode"] == 3 and any("observed_slowdown" in n for n in payload["state_features"])


def test_orphaned_temp_files_of_a_killed_writer_are_removed_at_the_next_start(tmp_path):
    from modes.validate import check_outputs
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".policy.pt.pid{int(dead.stdout)}-abcd1234.tmp"
    in_flight = tmp_path / f".policy.pt.pid{os.getpid()}-abcd1234.tmp"
    orphan.write_bytes(b"half a checkpoint")
    in_flight.write_bytes(b"being written")
    check_outputs(RunConfig(mode="train", checkpoint=str(tmp_path / "policy.pt"), report_dir=str(tmp_path / "r")))
    assert not orphan.exists() and in_flight.exists()
    assert clean_orphaned_temp_files(tmp_path) == []


def interrupt_run(tmp_path: Path, sig: int, after_s: float, episodes: int = 40) -> tuple[int, str, Path]:
    """Start a live tiny training run, send ``sig`` after ``after_s`` seconds, return (exit code, stderr, checkpoint)."""
    checkpoint = tmp_path / "policy.pt"
    argv = [sys.executable, str(ROOT / "adaptive_pruning.py"), "--mode", "train", "--model", "tiny", "--environment",
            "live", "--train-dataset", "builtin", "--episodes", str(episodes), "--save-every", "5", "--checkpoint",
            str(checkpoint), "--report-dir", str(tmp_path / "reports"), *FAST]
    proc = subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    time.sleep(after_s)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"signal {sig} at {after_s:.1f} s: the run did not end within 120 s")
    return proc.returncode, err, checkpoint


def check_truthful(code: int, err: str, checkpoint: Path, episodes: int) -> str:
    """What the run said it saved is what is on disk; returns 'saved', 'nothing' or 'finished'."""
    assert "Traceback" not in err, err[-3000:]
    if code == 0:
        assert load_checkpoint(checkpoint)["next_episode"] == episodes
        return "finished"
    assert code == 130, err[-2000:]
    if "saved: checkpoint" in err:
        payload = load_checkpoint(checkpoint)
        assert 0 <= payload["next_episode"] <= episodes
        return "saved"
    assert "before anything was saved" in err, err[-2000:]
    assert not checkpoint.exists()
    return "nothing"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_a_random_time_is_resumable_or_truthfully_reported(tmp_path, sig):
    after = random.Random(int(sig)).uniform(1.0, 25.0)
    code, err, checkpoint = interrupt_run(tmp_path, sig, after)
    outcome = check_truthful(code, err, checkpoint, 40)
    if outcome == "saved":   # and it continues
        resumed = subprocess.run([sys.executable, str(ROOT / "adaptive_pruning.py"), "--mode", "train", "--model",
                                  "tiny", "--environment", "live", "--train-dataset", "builtin", "--episodes", "40",
                                  "--resume", "--checkpoint", str(checkpoint), "--report-dir",
                                  str(tmp_path / "reports"), *FAST], cwd=tmp_path, capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert load_checkpoint(checkpoint)["next_episode"] == 40
    assert not list(checkpoint.parent.glob(".*.tmp"))
