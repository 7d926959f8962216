"""llama.cpp on the exported GGUFs: does the per-layer (deci) file load, give the engine's logits, and decode faster?

Exports the dense model and ``--action`` with the CLI's default engine (global allocation, compensation) as
F32 GGUFs (``--mode export --gguf``), loads both with llama-cpp-python, and reports:

- ``logits``: max |llama.cpp - engine| over a 32-token sequence, and the top-1 agreement, per file;
- ``ms/tok``: decode step time (fixed ``--tokens`` after a ``--prompt-tokens`` prompt, EOS ignored, greedy),
  median over ``--repeats`` rounds timed interleaved dense, pruned, dense, pruned ...; the ratio's denominator
  is the dense model in the same runtime and run;
- ``ideal``: bytes read per token, dense / pruned (the engine's cost model), for achieved / ideal.

Needs the optional ``llama-cpp-python`` (pyproject's ``[bench]`` extra: a source build of several minutes)::

    PYTHONPATH=. .venv/bin/python bench/gguf_decode.py --model smollm2-135m --action ffn_neurons:0.5 \\
        --json bench/gguf_decode.json
"""
from __future__ import annotations

import sys

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

openmp.configure()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.script import bench_main  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.markdown import md_table  # noqa: E402
from environments.session import build_engine  # noqa: E402
from model_loader import embedded_gguf_path, load_model  # noqa: E402
from pruners import NONE, PruningAction  # noqa: E402
from pruners.export.checkpoint import export_pruned  # noqa: E402

log = logging.getLogger("gguf_decode")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--action", default="ffn_neurons:0.5")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per timing")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="interleaved (dense, pruned) rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def decode_ms(llm, prompt: list[int], tokens: int) -> float:
    """Median ms per greedy decode step after ``prompt`` (EOS ignored: a fixed number of steps)."""
    llm.reset()
    llm.eval(prompt)
    steps = []
    for _ in range(tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        started = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - started)
    return 1e3 * statistics.median(steps)


def logits_check(llm, model, engine, action: PruningAction, ids: list[int]) -> dict:
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)], dtype=np.float32)
    with engine.pruned(action), torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    return {"max_abs_diff": float(np.abs(got - expected).max()),
            "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean())}


def run(args: argparse.Namespace) -> dict:
    import llama_cpp

    loaded = load_model(args.model, device="cpu")
    action = PruningAction.parse(args.action)
    cfg = replace(RunConfig(), model=args.model, device="cpu")
    engine = build_engine(cfg, loaded, [action])
    vocab = embedded_gguf_path() if loaded.source == "embedded" else None
    out = Path(tempfile.mkdtemp(prefix="gguf-decode-"))
    files, llms, result = {}, {}, {"model": loaded.name, "action": action.label, "engine": engine.describe([action]),
                                   "llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "rows": {}}
    for label, act in (("dense", NONE), (action.label, action)):
        folder = export_pruned(loaded, engine, act, out / label.replace(":", "-"), gguf=True, vocab_gguf=vocab)
        files[label] = folder / "model.gguf"
        llms[label] = llama_cpp.Llama(str(files[label]), n_ctx=args.prompt_tokens + args.tokens + 8,
                                      n_threads=args.threads, logits_all=True, verbose=False)
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(10, loaded.model.config.vocab_size, 32)]
    prompt = [int(t) for t in rng.integers(10, loaded.model.config.vocab_size, args.prompt_tokens)]
    times: dict[str, list[float]] = {label: [] for label in llms}
    load_before = psutil.getloadavg()[0]
    for _ in tqdm(range(args.repeats), desc="interleaved rounds"):
        for label, llm in llms.items():
            times[label].append(decode_ms(llm, prompt, args.tokens))
    dense_ms = statistics.median(times["dense"])
    for label, act in (("dense", NONE), (action.label, action)):
        ms = statistics.median(times[label])
        result["rows"][label] = {
            "gguf_architecture": json.loads((files[label].parent / "pruning.json").read_text())["gguf"]["architecture"],
            "gguf_mb": files[label].stat().st_size / 1e6,
            "logits": logits_check(llms[label], loaded.model, engine, act, ids),
            "ms_per_token": ms, "all_ms": times[label], "speedup": dense_ms / ms,
            "ideal_speedup": engine.ideal_speedup(act)}
    result["load_average_1min"] = {"before": load_before, "after": psutil.getloadavg()[0]}
    return result


def render(result: dict) -> str:
    rows = [[label, r["gguf_architecture"], f"{r['gguf_mb']:.0f}", f"{r['logits']['max_abs_diff']:.2e}",
             f"{r['logits']['top1_agreement']:.3f}", f"{r['ms_per_token']:.2f}", f"{r['speedup']:.2f}",
             f"{r['ideal_speedup']:.2f}", f"{r['speedup'] / r['ideal_speedup']:.2f}"]
            for label, r in result["rows"].items()]
    head = (f"{result['model']}, llama-cpp-python {result['llama_cpp_python']}, F32, {result['threads']} threads; "
            f"1-min load average {result['load_average_1min']['before']:.1f} -> {result['load_average_1min']['after']:.1f}")
    return head + "\n\n" + "\n".join(md_table(["model", "GGUF arch", "MB", "max |logit diff| vs engine", "top-1 agree",
                                     "ms/tok", "speedup", "ideal", "ach/ideal"], rows))


if __name__ == "__main__":
    bench_main(sys.argv[1:], parse_args, run, render)
