"""Does every pruning action buy the speed its size promises? One row per action.

Columns: parameters read per decoded token, ideal decode speedup (bytes read per token,
dense / pruned; the tied lm_head is read every token), measured decode speedup (median over
interleaved dense/pruned run pairs of the ratio of median decode-step times, EOS ignored),
achieved / ideal, prefill speedup, apply+restore time
(median of 100), the time naive pruning takes to rebuild nn.Linear modules, and the WikiText-2
perplexity ratio pruned / dense on a fixed slice (skipped for random-weight models).
KV-cache actions run on a long prompt (--kv-prompt-tokens); their PPL scores the tokens that
follow a pruned long context.

    PYTHONPATH=. python bench/pruning_speed.py --model smollm2-135m --json bench/smollm2.json
"""
from __future__ import annotations

import os
import sys

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":   # the policy measured for this machine, as in the CLI (ADAPTIVE_PRUNING_OMP overrides)
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn

import model_loader  # noqa: E402
from bench.script import bench_main  # noqa: E402
from common.config import RuntimeConfig  # noqa: E402
from runtime.governor import ExecutionGovernor  # noqa: E402
from runtime.generation import generate, prefill  # noqa: E402
from pruners import ACTION_SPACE, NONE, PruningAction, get_target  # noqa: E402
from pruners.engine import PruningEngine  # noqa: E402
from pruners.units.kv_cache import KVCachePruner  # noqa: E402

log = logging.getLogger("bench.pruning_speed")
DEFAULT_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"


@dataclass
class Row:
    action: str
    effective_intensity: float
    params_per_token: int
    ideal_speedup: float
    decode_speedup: float
    achieved_over_ideal: float
    prefill_speedup: float
    dense_decode_ms: float
    pruned_decode_ms: float
    apply_restore_us: float
    rebuild_ms: float | None
    ppl_ratio: float | None
    prompt_tokens: int
    cache_tokens: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default="structural", choices=("structural", "mask"))
    p.add_argument("--importance", default=None, choices=("magnitude", "activation", "block_influence"),
                   help="default: activation for real weights, magnitude for random ones")
    p.add_argument("--kv-policy", default="streaming", choices=("streaming", "h2o"))
    p.add_argument("--threads", type=int, default=None,
                   help="fixed torch threads (default: the execution governor's rule for the machine's state)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="interleaved dense/pruned pairs per action")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for non-KV actions")
    p.add_argument("--kv-prompt-tokens", type=int, default=1024)
    p.add_argument("--wikitext-path", type=Path, default=DEFAULT_WIKITEXT)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-window-tokens", type=int, default=512)
    p.add_argument("--kv-ppl-windows", type=int, default=2)
    p.add_argument("--kv-ppl-scored-tokens", type=int, default=128)
    p.add_argument("--actions", nargs="*", default=None, help="labels like ffn_neurons:0.5 (default: ACTION_SPACE)")
    p.add_argument("--json", type=Path, default=None, help="also write rows + settings here")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_us(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def rebuild_linears(engine: PruningEngine, action: PruningAction) -> None:
    """What a naive pruner does per switch: new nn.Linear modules holding copied slices."""
    layers = engine.model.model.layers
    for layer_idx, cut in engine.cuts(action):
        old = layers[layer_idx].get_submodule(cut.path)
        rows, cols = (cut.keep, old.in_features) if cut.dim == 0 else (old.out_features, cut.keep)
        new = nn.Linear(cols, rows, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight[:rows, :cols])


@torch.inference_mode()
def mean_nll(model: nn.Module, windows: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
        total += nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return total / count


@torch.inference_mode()
def kv_mean_nll(model: nn.Module, windows: list[torch.Tensor], context: int, kv: KVCachePruner | None) -> float:
    """Score the tokens after a ``context``-token prefix whose cache was (maybe) pruned."""
    total, count = 0.0, 0
    for ids in windows:
        pre = prefill(model, ids[None, :context], kv)
        rest = ids[context:]
        positions = torch.arange(context, ids.numel(), device=ids.device)[None]
        tail = model(input_ids=rest[None], position_ids=positions, past_key_values=pre.cache, use_cache=True).logits[0]
        logits = torch.cat([pre.logits, tail[:-1]]).float()
        total += nn.functional.cross_entropy(logits, rest, reduction="sum").item()
        count += rest.numel()
    return total / count


def timed_pairs(engine: PruningEngine, action: PruningAction, prompt: torch.Tensor, new_tokens: int,
                repeats: int) -> tuple[list, list]:
    """Interleaved A/B runs (ABAB.. with alternating order) so drifting load hits both sides alike."""
    model = engine.model
    dense, pruned = [], []
    for rep in range(repeats):
        order = (False, True) if rep % 2 == 0 else (True, False)
        for prune in order:
            if prune:
                with engine.pruned(action):
                    pruned.append(generate(model, prompt, new_tokens, engine=engine))
            else:
                dense.append(generate(model, prompt, new_tokens))
    return dense, pruned


def median_of(results, attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in results)


def paired_speedup(dense: list, pruned: list, attr: str) -> float:
    """Median over adjacent (dense, pruned) pairs of dense / pruned: slow load drift cancels."""
    return statistics.median(getattr(d, attr) / getattr(p, attr) for d, p in zip(dense, pruned))


def wikitext_ids(path: Path, tokenizer, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the file (a fixed slice; at most 8 characters per token read)."""
    if not path.is_file():
        raise SystemExit(f"WikiText-2 not found at {path}: pass --wikitext-path")
    ids = tokenizer(path.read_text(encoding="utf-8")[: 8 * tokens], return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        raise SystemExit(f"{path} gives only {ids.numel()} tokens, {tokens} needed")
    return ids[:tokens]


def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()
    loaded = model_loader.load_model(args.model, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    setting = ExecutionGovernor(RuntimeConfig(threads=args.threads), device=device).govern()
    real_weights = loaded.source != "random"
    importance = args.importance or ("activation" if real_weights else "magnitude")
    kv_len = args.kv_prompt_tokens + args.kv_ppl_scored_tokens
    needed = max(args.ppl_windows * args.ppl_window_tokens, args.kv_ppl_windows * kv_len, args.kv_prompt_tokens)
    text_ids = wikitext_ids(args.wikitext_path, tok, needed).to(device)
    # calibration: the engine's default set (built-in prompts + Alpaca), never WikiText-2 test (issue 15)
    engine = PruningEngine(model, mode=args.mode, importance=importance, tokenizer=tok, kv_policy=args.kv_policy)
    actions = [PruningAction.parse(a) for a in args.actions] if args.actions else ACTION_SPACE
    prompt = text_ids[:args.prompt_tokens]
    kv_prompt = text_ids[:args.kv_prompt_tokens]

    windows = [text_ids[i * args.ppl_window_tokens:(i + 1) * args.ppl_window_tokens] for i in range(args.ppl_windows)]
    kv_windows = [text_ids[i * kv_len:(i + 1) * kv_len] for i in range(args.kv_ppl_windows)]
    dense_nll = mean_nll(model, windows) if real_weights else None
    dense_kv_nll = kv_mean_nll(model, kv_windows, args.kv_prompt_tokens, None) if real_weights else None
    generate(model, prompt, 4)   # warm-up

    rows = []
    for action in actions:
        if action == NONE:
            continue
        is_kv = get_target(action.target).while_generating
        ids = kv_prompt if is_kv else prompt
        dense_runs, pruned_runs = timed_pairs(engine, action, ids, args.new_tokens, args.repeats)
        dense_tok, pruned_tok = median_of(dense_runs, "median_step_s"), median_of(pruned_runs, "median_step_s")
        ideal = engine.ideal_speedup(action, ids.numel(), args.new_tokens / 2)
        measured = paired_speedup(dense_runs, pruned_runs, "median_step_s")
        switch_us = median_us(lambda: (engine.apply(action), engine.restore()), 100, device)
        rebuild = None
        if action.target in ("attention_heads", "ffn_neurons"):
            rebuild = median_us(lambda: rebuild_linears(engine, action), 3, device) / 1e3
        ppl_ratio = None
        if real_weights:
            with engine.pruned(action):
                if is_kv:
                    nll = kv_mean_nll(model, kv_windows, args.kv_prompt_tokens, engine.kv_pruner)
                    ppl_ratio = math.exp(nll - dense_kv_nll)
                else:
                    ppl_ratio = math.exp(mean_nll(model, windows) - dense_nll)
        rows.append(Row(
            action=action.label, effective_intensity=engine.effective_intensity(action, ids.numel() if is_kv else None),
            params_per_token=engine.decode_cost(action).weight_params, ideal_speedup=ideal,
            decode_speedup=measured, achieved_over_ideal=measured / ideal,
            prefill_speedup=paired_speedup(dense_runs, pruned_runs, "prefill_s"),
            dense_decode_ms=dense_tok * 1e3, pruned_decode_ms=pruned_tok * 1e3, apply_restore_us=switch_us,
            rebuild_ms=rebuild, ppl_ratio=ppl_ratio, prompt_tokens=ids.numel(),
            cache_tokens=pruned_runs[0].cache_tokens_after_prune))
        log.info("%s done", action.label)
    settings = {"model": loaded.name, "source": loaded.source, "device": str(device), "mode": args.mode,
                "importance": importance, "kv_policy": args.kv_policy, "threads": setting.threads,
                "new_tokens": args.new_tokens, "repeats": args.repeats, "prompt_tokens": prompt.numel(),
                "kv_prompt_tokens": kv_prompt.numel(), "dtype": str(next(model.parameters()).dtype),
                "dense_params_per_token": engine.decode_cost(NONE).weight_params,
                "dense_ppl": math.exp(dense_nll) if dense_nll is not None else None,
                "runtime": setting.label, "runtime_state": setting.state,
                "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "torch": torch.__version__, "platform": platform.platform(), "cpu": platform.processor()}
    return {"settings": settings, "rows": [asdict(r) for r in rows]}


def format_table(result: dict) -> str:
    s = result["settings"]
    head = (f"{s['model']} ({s['source']}) on {s['device']}, {s['dtype']}, threads={s['threads']}, mode={s['mode']}, "
            f"importance={s['importance']}, kv={s['kv_policy']}; {s['new_tokens']} new tokens, {s['repeats']} "
            f"interleaved pairs; prompt {s['prompt_tokens']} tok (KV: {s['kv_prompt_tokens']}); dense "
            f"{s['dense_params_per_token'] / 1e6:.1f}M params/token"
            + (f", dense PPL {s['dense_ppl']:.2f}" if s["dense_ppl"] else "")
            + f"; runtime {s['runtime']} ({s['runtime_state']}), load avg before/after {s['loadavg_1m_before_after']}")
    cols = ("action", "eff", "Mparam/tok", "ideal", "decode", "ach/ideal", "prefill", "ms/tok d->p",
            "switch us", "rebuild ms", "PPL ratio", "cache")
    lines = [head, " | ".join(cols), " | ".join("-" * len(c) for c in cols)]
    for r in result["rows"]:
        lines.append(" | ".join((
            r["action"], f"{r['effective_intensity']:.3f}", f"{r['params_per_token'] / 1e6:.1f}",
            f"{r['ideal_speedup']:.3f}x", f"{r['decode_speedup']:.3f}x", f"{r['achieved_over_ideal']:.2f}",
            f"{r['prefill_speedup']:.2f}x", f"{r['dense_decode_ms']:.1f}->{r['pruned_decode_ms']:.1f}",
            f"{r['apply_restore_us']:.0f}", "-" if r["rebuild_ms"] is None else f"{r['rebuild_ms']:.1f}",
            "-" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:.3f}", f"{r['cache_tokens']}/{r['prompt_tokens']}")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run, format_table)


if __name__ == "__main__":
    main()
