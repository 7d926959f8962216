"""Does dispatching through target objects slow the per-prompt switch? apply + restore, this checkout
against another (e.g. the code before targets became classes), interleaved.

Each round runs one child process per code tree, alternating (A B A B ...); a child loads the model, builds
an engine (data-free magnitude importance, uniform allocation, no recovery: no calibration pass) and prints,
per action, the lowest of 5 block medians of apply + restore (``--repeats`` each). The table gives, per action,
the median over rounds for each tree and the ratio this / other.

    git archive 1435c52 | tar -x -C /tmp/before-targets
    PYTHONPATH=. python bench/switch_cost.py --other /tmp/before-targets --model smollm2-135m
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from bench.script import bench_main
from common.markdown import md_table

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, statistics, sys, time
from runtime import openmp
openmp.configure("passive")
import torch
torch.set_num_threads(1)
import model_loader
from pruners import ACTION_SPACE, PruningEngine
loaded = model_loader.load_model(sys.argv[1], device="cpu")
engine = PruningEngine(loaded.model, importance="magnitude", cache_dir=sys.argv[3])
engine.prepare(ACTION_SPACE, progress=False)
out = {}
for action in ACTION_SPACE:
    blocks = []
    for _ in range(5):        # the quietest of 5 blocks: other processes on a shared machine only add time
        times = []
        for _ in range(int(sys.argv[2])):
            start = time.perf_counter()
            engine.apply(action)
            engine.restore()
            times.append(time.perf_counter() - start)
        blocks.append(statistics.median(times))
    out[action.label] = min(blocks) * 1e6
print(json.dumps(out))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", required=True, type=Path, help="the other code tree (a git archive of another commit)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=3, help="interleaved (this, other) pairs of child processes")
    p.add_argument("--repeats", type=int, default=200, help="apply + restore per action per child")
    p.add_argument("--cache-dir", default="/tmp/switch-cost-cache", help="importance cache of the children")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def child(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.repeats), args.cache_dir], cwd=tree,
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    trees = {"this": ROOT, "other": args.other.resolve()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in tqdm(range(args.rounds), desc="rounds (this, other)", unit="round"):
        for name, tree in trees.items():
            runs[name].append(child(tree, args))
    labels = list(runs["this"][0])
    rows = [{"action": label, **{f"{name}_us": statistics.median(r[label] for r in runs[name]) for name in trees}}
            for label in labels]
    for row in rows:
        row["ratio"] = row["this_us"] / row["other_us"]
    return {"model": args.model, "other": str(args.other), "rounds": args.rounds, "repeats": args.repeats,
            "rows": rows, "median_ratio": statistics.median(r["ratio"] for r in rows)}


def render(result: dict) -> str:
    table = md_table(["action", "this (us)", "other (us)", "this / other"],
                     [[r["action"], f"{r['this_us']:.1f}", f"{r['other_us']:.1f}", f"{r['ratio']:.2f}"]
                      for r in result["rows"]])
    return "\n".join(table) + f"\n\nmedian ratio this / other over actions: {result['median_ratio']:.2f}"


if __name__ == "__main__":
    bench_main(None, parse_args, run, render)
