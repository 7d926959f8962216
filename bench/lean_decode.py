"""The lean decode step against HF's forward over a static cache (issue 25): ms/token per weight dtype and action.

Every decoder runs on the decode kernel (``runtime.matvec``) with the same model, engine, prompt and thread count;
only the step differs: ``runtime.compiled.StaticCacheDecoder`` (HF's forward), ``runtime.lean.LeanDecoder`` with
``one_call=False`` (its torch-op loop over the layers) and ``LeanDecoder`` (the kernel's one-call step,
``runtime/lean_step.cpp``). Interleaved: in every round each (dtype, action) cell generates once per decoder, the
order alternating by round (ABC CBA); a cell's
figure is the median over rounds of each generation's median step. A cell the lean step cannot run exactly is
reported as such (it would time StaticCacheDecoder twice).

    PYTHONPATH=. .venv/bin/python bench/lean_decode.py --model smollm2-135m
"""
from __future__ import annotations

import sys

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import model_loader  # noqa: E402
from bench.script import bench_main  # noqa: E402
from evaluation.speed import probe_prompt  # noqa: E402
from pruners import NONE, PruningAction, PruningEngine  # noqa: E402
from runtime.compiled import StaticCacheDecoder  # noqa: E402
from runtime.dtype import apply_weight_dtype, set_kernel  # noqa: E402
from runtime.generation import generate  # noqa: E402
from runtime.lean import LeanDecoder, unsupported  # noqa: E402
from runtime.matvec import matvec_kernel  # noqa: E402

DECODERS = ("static", "loop", "lean")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--actions", default="ffn_neurons:0.2,transformer_layers:0.2", help="action labels besides dense")
    p.add_argument("--dtypes", default="float32,int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (every cell and decoder once per round)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    loaded = model_loader.load_model(args.model, device="cpu")
    model = loaded.model
    engine = PruningEngine(model, importance="magnitude")   # speed depends on how many units are kept, not which
    set_kernel(model, matvec_kernel("native"))
    actions = [NONE] + [PruningAction.parse(a) for a in args.actions.split(",") if a.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    ids = probe_prompt(loaded.tokenizer, args.prompt_tokens)
    decoders = {"static": StaticCacheDecoder(model, engine), "loop": LeanDecoder(model, engine, one_call=False),
                "lean": LeanDecoder(model, engine)}
    cells = [(dtype, action) for dtype in dtypes for action in actions]
    samples: dict[tuple[str, str, str], list[float]] = {(d, a.label, n): [] for d, a in cells for n in DECODERS}
    lean_runs: dict[tuple[str, str], str | None] = {}

    def one_round(order: tuple[str, ...], keep: bool) -> None:
        for dtype, action in cells:
            apply_weight_dtype(model, dtype)
            with engine.pruned(action):
                lean_runs[dtype, action.label] = unsupported(model, engine)
                for name in order:
                    step = generate(model, ids, args.new_tokens, engine=engine, decoder=decoders[name]).median_step_s
                    if keep:
                        samples[dtype, action.label, name].append(step * 1e3)
    started = time.time()
    one_round(DECODERS, keep=False)                       # warm-up: kernels, shadows, caches
    for r in tqdm(range(args.rounds), desc="rounds"):
        one_round(DECODERS if r % 2 == 0 else DECODERS[::-1], keep=True)
    rows = []
    for dtype, action in cells:
        ms = {n: statistics.median(samples[dtype, action.label, n]) for n in DECODERS}
        rows.append({"dtype": dtype, "action": action.label, "static_ms": ms["static"], "loop_ms": ms["loop"],
                     "lean_ms": ms["lean"], "speedup": ms["static"] / ms["lean"],
                     "one_call_speedup": ms["loop"] / ms["lean"], "lean_ran": lean_runs[dtype, action.label] is None,
                     "fallback_reason": lean_runs[dtype, action.label]})
    return {"settings": {"model": loaded.name, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, "rounds": args.rounds, "kernel": "native",
                         "openmp": openmp.active().policy, "cpu": openmp.cpu_model(), "torch": torch.__version__,
                         "loadavg_1m": round(os.getloadavg()[0], 2), "wall_s": round(time.time() - started, 1)},
            "rows": rows, "samples_ms": {"|".join(k): v for k, v in samples.items()}}


def render(result: dict) -> str:
    s = result["settings"]
    lines = [f"{s['model']}, {s['threads']} threads ({s['cpu']}), OpenMP {s['openmp']}, torch {s['torch']}, decode "
             f"kernel {s['kernel']}; prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new, {s['rounds']} "
             f"interleaved rounds; load avg {s['loadavg_1m']} at the end; {s['wall_s']} s",
             "dtype | action | StaticCacheDecoder ms/token | lean, torch-op loop | lean, one call | speedup over "
             "static | one call over loop",
             "----- | ------ | -------------------------- | ------------------- | -------------- | ------------------"
             " | ------------------"]
    for r in result["rows"]:
        lean = f"{r['loop_ms']:.1f} | {r['lean_ms']:.1f}" if r["lean_ran"] else \
            f"(fell back: {r['fallback_reason']}) | -"
        lines.append(f"{r['dtype']} | {r['action']} | {r['static_ms']:.1f} | {lean} | {r['speedup']:.2f}x | "
                     f"{r['one_call_speedup']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run, render)


if __name__ == "__main__":
    main()
