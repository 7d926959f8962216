"""Which background loads slow the dense model here, and which telemetry features tell them apart.

Why: a load level the model does not feel teaches the policy nothing (issue 16: a "loaded"
calibration measured x0.86), and CPU utilisation reads 100 % at every level on a busy machine.
For each candidate level, in seeded interleaved rounds (so other users' load spreads over all
levels), this times the dense model (prefill + median decode step) and records each telemetry
feature, then prints the slowdown against idle of the same round and each feature's per-level mean.

    PYTHONPATH=. python bench/contention_levels.py --model smollm2-135m --rounds 3 --out bench/contention_levels.json
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as adaptive_pruning.py, before torch loads

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from machine.contention import contention, presets  # noqa: E402
from runtime.generation import generate  # noqa: E402
from machine.telemetry import HardwareState, TelemetrySampler  # noqa: E402
from model_loader import load_model  # noqa: E402
from common.files import strict_json  # noqa: E402

log = logging.getLogger("contention_levels")
FEATURES = ("cpu_util", "process_cpu_util", "load_per_core") + HardwareState.CONTENTION_NAMES


def features(state: HardwareState) -> dict[str, float]:
    named = dict(zip(HardwareState.FEATURE_NAMES, state.vector)) | dict(zip(HardwareState.CONTENTION_NAMES,
                                                                            state.contention_vector))
    return {k: named[k] for k in FEATURES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--levels", default="idle,light,moderate,heavy,stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per level and round")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the raw samples as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loaded = load_model(args.model, device="cpu")
    ids = loaded.tokenizer("Explain briefly why the sky looks blue during the day and red at sunset, "
                           "in terms a curious child would follow.", return_tensors="pt").input_ids
    scenarios = [presets()[n] for n in args.levels.split(",")]
    samples: list[dict] = []
    rng = np.random.default_rng(0)
    with TelemetrySampler(rate_hz=10) as sampler:
        generate(loaded.model, ids, args.tokens)   # warm-up
        for round_ in range(args.rounds):
            for i in rng.permutation(len(scenarios)):
                sc = scenarios[int(i)]
                with contention(sc):
                    time.sleep(0.5)   # one more telemetry window under the load
                    for _ in range(args.repeats):
                        g = generate(loaded.model, ids, args.tokens)
                        samples.append({"round": round_, "level": sc.name, "prefill_s": g.prefill_s,
                                        "step_s": g.median_step_s, **features(sampler.latest())})
    idle = {r: statistics.median(s["step_s"] for s in samples if s["level"] == "idle" and s["round"] == r)
            for r in range(args.rounds)}
    print(f"{'level':10s} {'slowdown':>9s} " + " ".join(f"{f:>20s}" for f in FEATURES))
    for sc in scenarios:
        mine = [s for s in samples if s["level"] == sc.name]
        slow = statistics.median(s["step_s"] / idle[s["round"]] for s in mine)
        print(f"{sc.name:10s} {slow:9.2f} " + " ".join(f"{statistics.mean(s[f] for s in mine):20.3f}" for f in FEATURES))
    if args.out:
        with open(args.out, "w") as f:
            f.write(strict_json({"model": loaded.name, "tokens": args.tokens, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
