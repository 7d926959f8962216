"""Interrupts of a live tiny training run at random times: is each one resumable or truthfully reported?

Each try starts `adaptive_pruning.py --mode train --model tiny --environment live` (default state features),
sends SIGINT or SIGTERM (chosen at random) after a uniformly random delay, and classifies what happened:

- finished:  the run ended before the signal landed (exit 0, checkpoint at the last episode);
- saved:     exit 130, "saved: checkpoint ..." printed, the checkpoint loads, and `--resume` completes the run;
- nothing:   exit 130, "before anything was saved" printed, and no checkpoint exists;
- WRONG:     anything else (a traceback, a claim the disk contradicts, a resume that fails, a leftover .tmp).

Then SIGKILL tries: the run is killed hard, and the next start must leave no orphaned `.tmp` file.
Prints one line per try and a summary; exit status 1 if any try is WRONG.

    .venv/bin/python bench/interrupts.py --tries 30 --kills 3 --seed 0
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.checkpointing import load_checkpoint  # noqa: E402

# Small and quick on a loaded machine: regex prompt features (no spaCy load), a 2-action menu, a small calibration.
FAST = ["--max-new-tokens", "8", "--calibration-tokens", "4", "--calibration-repeats", "1", "--scenarios", "idle",
        "--train-samples", "40", "--telemetry-hz", "20", "--save-every", "3", "--calibration-samples", "32",
        "--nlp-backend", "regex", "--targets", "ffn_neurons", "--intensities", "0.25,0.5"]


def command(folder: Path, episodes: int, resume: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, str(ROOT / "adaptive_pruning.py"), "--mode", "train", "--model", "tiny", "--environment",
            "live", "--train-dataset", "builtin", "--episodes", str(episodes), "--checkpoint",
            str(folder / "policy.pt"), "--report-dir", str(folder / "reports"), *FAST, *extra,
            *(["--resume"] if resume else [])]


def start(folder: Path, episodes: int, resume: bool = False, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(command(folder, episodes, resume, extra), cwd=folder, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_try(folder: Path, sig: int, delay: float, episodes: int, extra: tuple[str, ...]) -> tuple[str, str]:
    proc = start(folder, episodes, extra=extra)
    time.sleep(delay)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "WRONG", "did not end within 300 s of the signal"
    checkpoint = folder / "policy.pt"
    if "Traceback" in err:
        return "WRONG", "traceback: " + err.strip().splitlines()[-1]
    if list(folder.glob(".*.tmp")):
        return "WRONG", "leftover temp file"
    if proc.returncode == 0:
        ok = load_checkpoint(checkpoint)["next_episode"] == episodes
        return ("finished", "") if ok else ("WRONG", "exit 0 without a complete checkpoint")
    if proc.returncode != 130:
        return "WRONG", f"exit {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"
    if "saved: checkpoint" in err:
        at = load_checkpoint(checkpoint)["next_episode"]
        resumed = subprocess.run(command(folder, episodes, resume=True, extra=extra), cwd=folder, capture_output=True, text=True,
                                 timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if resumed.returncode != 0 or load_checkpoint(checkpoint)["next_episode"] != episodes:
            return "WRONG", f"resume from episode {at} failed: {resumed.stderr.strip().splitlines()[-1:]}"
        return "saved", f"at episode {at}, resumed to {episodes}"
    if "before anything was saved" in err:
        return ("nothing", "") if not checkpoint.exists() else ("WRONG", "said nothing saved, a checkpoint exists")
    return "WRONG", "exit 130 without saying what was saved"


def kill_try(folder: Path, delay: float, episodes: int, extra: tuple[str, ...]) -> tuple[str, str]:
    """SIGKILL, then start again: the new start must clean any orphaned temp file the kill left."""
    proc = start(folder, episodes, extra=extra)
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    left = len(list(folder.glob(".*.tmp")))
    again = start(folder, episodes, extra=extra)   # runs to its end: its start (validation) removes the orphans
    again.communicate(timeout=600)
    remaining = [p.name for p in folder.glob(".*.tmp") if f"pid{proc.pid}-" in p.name]
    return ("WRONG", f"orphans left: {remaining}") if remaining else ("clean", f"{left} temp file(s) after the kill")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=30)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--max-delay", type=float, default=None,
                        help="signals land uniformly in [0.5, this] s (default: 1.1 x an uninterrupted run, measured "
                             "first, so every phase is hit: start-up, calibration, training, the final writes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    outcomes: Counter = Counter()
    started = time.perf_counter()
    first = Path(tempfile.mkdtemp())   # an uninterrupted run: its duration, and its latency table for every try
    whole = start(first, args.episodes)
    whole.communicate(timeout=900)
    table = next((first / "reports").glob("train-*/latency_table.json"))
    extra = ("--latency-table", str(table))
    timed = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        again = start(Path(tmp), args.episodes, extra=extra)
        again.communicate(timeout=900)
    duration = time.perf_counter() - timed
    if args.max_delay is None:
        args.max_delay = 1.1 * duration
    print(f"an uninterrupted run reusing the first run's latency table took {duration:.0f} s (exit "
          f"{again.returncode}); signals land in [0.5, {args.max_delay:.0f}] s")
    for i in tqdm(range(args.tries), desc="SIGINT/SIGTERM tries"):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        delay = rng.uniform(0.5, args.max_delay)
        with tempfile.TemporaryDirectory() as tmp:
            outcome, detail = one_try(Path(tmp), sig, delay, args.episodes, extra)
        outcomes[outcome] += 1
        tqdm.write(f"try {i + 1:2d}: {signal.Signals(sig).name:7s} at {delay:5.1f} s -> {outcome} {detail}")
    for i in tqdm(range(args.kills), desc="SIGKILL tries"):
        delay = rng.uniform(5.0, args.max_delay)
        with tempfile.TemporaryDirectory() as tmp:
            outcome, detail = kill_try(Path(tmp), delay, args.episodes, extra)
        outcomes[outcome] += 1
        tqdm.write(f"kill {i + 1}: SIGKILL at {delay:5.1f} s -> {outcome} ({detail})")
    shutil.rmtree(first, ignore_errors=True)
    print(f"summary: {dict(outcomes)} in {time.perf_counter() - started:.0f} s "
          f"({args.tries} signal tries, {args.kills} kills, {args.episodes} episodes per run)")
    return 1 if outcomes["WRONG"] else 0


if __name__ == "__main__":
    sys.exit(main())
