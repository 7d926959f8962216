"""Weight dtype: what it costs in quality and what switching it (and actions on it) costs in time (issue 25).

- WikiText-2 perplexity of the dense model at each ``--dtypes`` (``runtime.dtype``) on the same windows,
  and the PPL ratio over float32 (the protocol of ``evaluation.wikitext``, the first ``--windows`` windows);
- apply + restore time of every action of ``--actions`` with int8 shadows (the prefix-view switch the
  controller pays per decision; the target is well under a millisecond), and of switching dtype itself.

    PYTHONPATH=. .venv/bin/python bench/quantization.py --windows 20 --seq-len 512
"""
from __future__ import annotations

import sys

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import model_loader  # noqa: E402
from bench.script import bench_main  # noqa: E402
from common.config import RunConfig  # noqa: E402
from environments.session import build_engine  # noqa: E402
from evaluation.wikitext import compute_perplexity, load_wikitext2_test  # noqa: E402
from pruners import NONE, PruningAction  # noqa: E402
from runtime.dtype import apply_weight_dtype, restore_weight_dtype, weight_dtype_scope  # noqa: E402
from runtime.timing import pass_times  # noqa: E402

ACTIONS = ("attention_heads:0.2,attention_heads:0.4,ffn_neurons:0.2,ffn_neurons:0.4,transformer_layers:0.2,"
           "transformer_layers:0.4,kv_cache:0.5")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--windows", type=int, default=20, help="WikiText-2 test windows scored (the first N)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--wikitext-path", default=None, help="default: $ADAPTIVE_PRUNING_DATA / the shared data folder")
    p.add_argument("--actions", default=ACTIONS)
    p.add_argument("--switches", type=int, default=50, help="timed apply+restore pairs per action")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP team to stall on a shared machine)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def switch_ms(fn, repeats: int) -> float:
    return statistics.median(pass_times(fn, repeats)) * 1e3


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    loaded = model_loader.load_model(args.model, device="cpu")
    corpus = load_wikitext2_test(args.wikitext_path)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    ppl = {}
    for dtype in dtypes:
        apply_weight_dtype(loaded.model, dtype)
        ppl[dtype] = compute_perplexity(loaded.model, loaded.tokenizer, corpus, seq_len=args.seq_len,
                                        max_windows=args.windows).ppl
    restore_weight_dtype(loaded.model)
    actions = [PruningAction.parse(a) for a in args.actions.split(",") if a.strip()]
    engine = build_engine(RunConfig(importance="magnitude", allocation="uniform", recovery="none"), loaded, actions)
    switches = {}
    for dtype in ("float32", "int8"):
        with weight_dtype_scope(loaded.model, dtype):
            for action in actions:
                engine.apply(action)          # the first apply builds the views (and int8 column copies)
                engine.restore()
                switches[f"{dtype}/{action.label}"] = switch_ms(lambda a=action: (engine.apply(a), engine.restore()),
                                                                args.switches)
    switches["dtype float32 <-> int8 (shadows kept)"] = switch_ms(
        lambda: (apply_weight_dtype(loaded.model, "int8"), restore_weight_dtype(loaded.model, keep=True)), args.switches)
    engine.restore()
    return {"settings": {"model": loaded.name, "windows": args.windows, "seq_len": args.seq_len,
                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
            "ppl": ppl, "ppl_ratio": {d: ppl[d] / ppl["float32"] for d in ppl} if "float32" in ppl else {},
            "switch_ms": switches, "dense": NONE.label}


def format_tables(result: dict) -> str:
    s = result["settings"]
    lines = [f"{s['model']}: WikiText-2 test, first {s['windows']} windows of {s['seq_len']} tokens; torch {s['torch']}, "
             f"{s['threads']} threads; started {s['started']}", "", "dtype | PPL | PPL ratio vs float32", "--- | --- | ---"]
    lines += [f"{d} | {p:.3f} | {result['ppl_ratio'].get(d, float('nan')):.4f}" for d, p in result["ppl"].items()]
    lines += ["", "switch | apply+restore ms (median)", "--- | ---"]
    lines += [f"{k} | {v:.3f}" for k, v in result["switch_ms"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run, format_tables)


if __name__ == "__main__":
    main()
