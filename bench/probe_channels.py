"""Channels chosen per prompt (issue 27, ``pruners.scoring.probe.select_units``): PPL ratio against the static order
and an in-domain static order, the gather cost per request and the decode speed of the gathered weights.

Each example is a context and a target: held-out Alpaca prompts with their 64-token dense greedy references
(from ``bench/headroom.py``'s cache: run it first), WikiText-2 test windows (first 128 tokens context, next 128
target) and LAMBADA test passages (first half context, second half target). The context's dense forward is
recorded (the request's prefill); each method keeps the engine's per-layer unit counts for the action:

- static: the engine's own prefix (default calibration, fluctuation order, its compensation);
- in-domain: the same counts ranked by the fluctuation on in-domain calibration text, compensated with its
  means (Alpaca: training-split instructions; WikiText-2: windows of the first half of the test articles,
  disjoint from the evaluated second half; LAMBADA: the file's last passages, disjoint from the evaluated first);
- probe w: this prompt's prefill fluctuation (x_j - mu_j)^2 ||W_j||^2 blended with the calibration's, each as a
  per-layer share, with weight w on the prompt (0.5: the issue's naive 1:1 blend, not tuned; 1: prompt alone).

Reported: exp(mean log PPL ratio) of the target under each method, and the share of the static order's excess
PPL (ratio - 1) the probe blend removes.

    PYTHONPATH=. timeout 2h .venv/bin/python bench/probe_channels.py --examples 30
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
import time
from pathlib import Path

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.headroom import ACTIONS as HEADROOM_ACTIONS, held_out_prompts  # noqa: E402
from common import hub  # noqa: E402
from common.config import EnvConfig, RunConfig  # noqa: E402
from common.data import data_root  # noqa: E402
from environments.outcomes.headroom import HeadroomRecord, record_path  # noqa: E402
from environments.outcomes.cache import engine_settings  # noqa: E402
from environments.outcomes.quality import score_reference  # noqa: E402
from environments.session import build_engine  # noqa: E402
from model_loader import load_model  # noqa: E402
from pruners import PruningAction  # noqa: E402
from pruners.scoring.calibration_pass import calibration_pass  # noqa: E402
from pruners.recovery.compensation import TailSums  # noqa: E402
from pruners.scoring.criteria import Fluctuation, Magnitude, Statistics, score_targets  # noqa: E402
from pruners.scoring.probe import PrefillRecorder, select_units  # noqa: E402
from runtime.generation import generate  # noqa: E402

log = logging.getLogger("probe_channels")

ACTIONS = ("ffn_neurons:0.2", "ffn_neurons:0.4", "attention_heads:0.2")
WEIGHTS = (0.5, 1.0)
WINDOW = 128


def wikitext(tokenizer, n_eval: int, n_calibration: int) -> tuple[list, list]:
    """(eval examples from the second half of the articles, calibration windows from the first half)."""
    text = (data_root() / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    articles = [a for a in re.split(r"\n(?= = [^=].* = \n)", text) if a.strip()]
    half = len(articles) // 2

    def windows(parts: list[str]) -> list[torch.Tensor]:
        out = []
        for article in parts:
            ids = tokenizer(article, return_tensors="pt").input_ids[0]
            out += [ids[i:i + 2 * WINDOW] for i in range(0, ids.numel() - 2 * WINDOW + 1, 4 * WINDOW)]
        return out
    evaluated = windows(articles[half:])
    step = max(1, len(evaluated) // n_eval)
    examples = [(w[:WINDOW], w[WINDOW:]) for w in evaluated[::step][:n_eval]]
    return examples, [w[:2 * WINDOW] for w in windows(articles[:half])][:n_calibration]


def lambada(tokenizer, n_eval: int, n_calibration: int) -> tuple[list, list]:
    lines = (data_root() / "lambada_openai" / "lambada_test.jsonl").read_text().splitlines()
    passages = [tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids[0] for line in lines[:n_eval]]
    calibration = [tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids[0]
                   for line in lines[-n_calibration:]]
    return [(p[:p.numel() // 2], p[p.numel() // 2:]) for p in passages], calibration


def alpaca(cfg: RunConfig, tokenizer, loaded, n_eval: int, n_calibration: int, folder: Path) -> tuple[list, list]:
    """Held-out prompts of the headroom run (their cached dense references); training prompts calibrate."""
    train, held = held_out_prompts(cfg, 2 * n_eval, 0.5)
    settings = {**engine_settings(cfg, loaded.name, loaded.source), "actions": list(HEADROOM_ACTIONS)}
    examples = []
    for prompt in held:
        path = record_path(folder, settings, prompt)
        if path.is_file():
            record = HeadroomRecord.from_dict(json.loads(path.read_text()))
            examples.append((torch.tensor(record.prompt_ids), torch.tensor(record.ref_ids)))
    if not examples:
        raise SystemExit(f"no headroom records in {folder}: run bench/headroom.py --prompts {2 * n_eval} first")
    calibration_prompts = held_out_prompts(cfg, 2 * n_calibration, 0.5)[0]
    calibration = [tokenizer(p.text, return_tensors="pt").input_ids[0] for p in calibration_prompts]
    return examples, calibration


def in_domain(model, engine, texts: list[torch.Tensor]):
    """Fluctuation scores (ffn, kv groups) and means of the model's current unit order on in-domain text."""
    tails = TailSums()
    calibration_pass(model, [t.view(1, -1) for t in texts if t.numel() > 1], [tails], desc="in-domain statistics")
    scores = score_targets("fluctuation", (Fluctuation(), Magnitude()), model, Statistics(tails=tails))
    return (scores.ffn, scores.kv_groups), tails.mean()


def nll(model, context: torch.Tensor, target: torch.Tensor) -> float:
    return score_reference(model, context, target).nll


def evaluate(model, engine, examples: list, statistics_in_domain, actions: list[PruningAction]) -> dict:
    """method -> action label -> [log PPL ratio per example]; plus the per-request selection times."""
    scores, means = statistics_in_domain
    out: dict = {"static": {}, "in-domain": {}, **{f"probe {w:g}": {} for w in WEIGHTS}}
    select_s: list[float] = []
    for context, target in tqdm(examples, desc="examples", unit="example", leave=False):
        engine.restore()
        with PrefillRecorder(model) as recorder, torch.inference_mode():
            model(input_ids=context.view(1, -1))
        dense = nll(model, context, target)
        for action in actions:
            with engine.pruned(action):
                out["static"].setdefault(action.label, []).append(nll(model, context, target) - dense)
            methods = [("in-domain", dict(weight=0.0, scores=scores, means=means))]
            methods += [(f"probe {w:g}", dict(weight=w)) for w in WEIGHTS]
            for name, kwargs in methods:
                started = time.perf_counter()
                selection = select_units(engine, recorder.record, action, **kwargs)
                if name == f"probe {WEIGHTS[0]:g}":
                    select_s.append(time.perf_counter() - started)
                selection.apply()
                try:
                    out[name].setdefault(action.label, []).append(nll(model, context, target) - dense)
                finally:
                    selection.restore()
    out["_select_s"] = select_s
    return out


def speed(model, engine, examples: list, action: PruningAction, tokens: int, repeats: int) -> str:
    """Interleaved per example: dense, static prefix views, gathered per-prompt selection; each a ``tokens``-token
    generation. Reports the gathered plan's speedup over the static plan's, and selection time per generation."""
    dense_s, static_s, probe_s, select_s = [], [], [], []
    for context, _ in examples:
        ids = context.view(1, -1)
        engine.restore()
        with PrefillRecorder(model) as recorder, torch.inference_mode():
            model(input_ids=ids)
        for _ in range(repeats):
            started = time.perf_counter()
            generate(model, ids, tokens)
            dense_s.append(time.perf_counter() - started)
            with engine.pruned(action):
                started = time.perf_counter()
                generate(model, ids, tokens)
                static_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            selection = select_units(engine, recorder.record, action, weight=WEIGHTS[0])
            select_s.append(time.perf_counter() - started)
            selection.apply()
            started = time.perf_counter()
            generate(model, ids, tokens)
            probe_s.append(time.perf_counter() - started)
            selection.restore()
    med = statistics.median
    return (f"{action.label}, {len(examples)} prompts x {repeats} interleaved: {tokens}-token generation median dense "
            f"{med(dense_s) * 1e3:.0f} ms, static {med(static_s) * 1e3:.0f} ms, gathered {med(probe_s) * 1e3:.0f} ms; "
            f"speedup static {med(dense_s) / med(static_s):.3f}x, gathered {med(dense_s) / med(probe_s):.3f}x "
            f"(gathered / static {med(static_s) / med(probe_s):.3f}, target >= 0.9); selection + gather "
            f"{med(select_s) * 1e3:.1f} ms = {med(select_s) / med(dense_s):.1%} of the dense generation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=30, help="evaluated examples per data set")
    parser.add_argument("--calibration-examples", type=int, default=128, help="in-domain calibration texts")
    parser.add_argument("--datasets", default="alpaca,wikitext,lambada")
    parser.add_argument("--cache-dir", default=None, help="bench/headroom.py's records (default <cache>/headroom)")
    parser.add_argument("--speed-prompts", type=int, default=3)
    parser.add_argument("--speed-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cfg = RunConfig(model=args.model, env=EnvConfig(max_new_tokens=64, min_reference_tokens=64))
    actions = [PruningAction.parse(a) for a in ACTIONS]
    loaded = load_model(cfg.model, device=cfg.device)
    model, tok = loaded.model, loaded.tokenizer
    engine = build_engine(cfg, loaded, actions)
    folder = Path(args.cache_dir or hub.cache_dir() / "headroom")
    loaders = {"alpaca": lambda: alpaca(cfg, tok, loaded, args.examples, args.calibration_examples, folder),
               "wikitext": lambda: wikitext(tok, args.examples, args.calibration_examples),
               "lambada": lambda: lambada(tok, args.examples, args.calibration_examples)}
    methods = ["static", "in-domain", *(f"probe {w:g}" for w in WEIGHTS)]
    print(f"model {loaded.name}, engine {cfg.importance} / {cfg.allocation} / {cfg.recovery}, torch threads "
          f"{torch.get_num_threads()}; PPL ratio = exp(mean log ratio) of the target tokens")
    print("| data | action | n | " + " | ".join(methods) + f" | excess PPL cut, probe {WEIGHTS[0]:g} vs static |")
    print("|---|---|---|" + "---|" * len(methods) + "---|")
    select_all, speed_examples = [], []
    for name in args.datasets.split(","):
        examples, calibration = loaders[name]()
        engine.restore()
        result = evaluate(model, engine, examples, in_domain(model, engine, calibration), actions)
        select_all += result.pop("_select_s")
        speed_examples = speed_examples or examples[:args.speed_prompts]
        for action in actions:
            ratios = {m: math.exp(statistics.fmean(result[m][action.label])) for m in methods}
            cut = 1 - (ratios[f"probe {WEIGHTS[0]:g}"] - 1) / (ratios["static"] - 1)
            print(f"| {name} | {action.label} | {len(examples)} | " + " | ".join(f"{ratios[m]:.3f}" for m in methods)
                  + f" | {cut:+.0%} |", flush=True)
    print(f"\nselection + gather per request (probe {WEIGHTS[0]:g}, all data sets): median "
          f"{statistics.median(select_all) * 1e3:.1f} ms over {len(select_all)} selections")
    if args.speed_prompts:
        for action in actions:
            print(speed(model, engine, speed_examples, action, args.speed_tokens, repeats=3), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
