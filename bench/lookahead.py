"""A short dense look-ahead against the prefill probe as a per-prompt damage signal (issue 27, item 2).

Reads the headroom records ``bench/headroom.py`` cached (the same prompts, split and engine; it never writes
them), measures per prompt and action the per-position KL and NLL difference on the reference
(``environments.outcomes.lookahead``, a resumable sidecar folder), then for each look-ahead length K the
headroom report (``reporting.headroom``: ridge fitted on training prompts only, held-out Spearman,
equal-compute routing) on the target a K-token look-ahead cannot see, the log PPL ratio of the reference after
K: the probe feature sets, the look-ahead KL of the action alone (its log), and probe + look-ahead. K = 0 is
the probe on the whole reference, as the headroom report scores it. ``--cost-prompts`` times the look-ahead
(K dense decode steps + one pruned forward over prompt + K) against a ``--cost-tokens`` generation.

A separate script rather than a ``--lookahead`` option of bench/headroom.py: it only reads that bench's cache
(which may be growing meanwhile), needs no prompt generation, NLP backend or Ray, and its report is per K.

    PYTHONPATH=. nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/lookahead.py --prompts 1000
    PYTHONPATH=. timeout 300 .venv/bin/python bench/lookahead.py --no-report --cost-prompts 5 --threads 2
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.headroom import (ACTIONS, FEATURE_SETS, held_out_prompts, record_set_arguments,  # noqa: E402
                            record_set_config, to_damage)
from common import hub  # noqa: E402
from environments.outcomes.cache import engine_settings  # noqa: E402
from environments.outcomes.headroom import HeadroomRecord, record_path  # noqa: E402
from environments.outcomes.lookahead import KS, LookaheadRecord, measure_all, sidecar_path  # noqa: E402
from environments.outcomes.quality import score_reference, token_kl  # noqa: E402
from environments.session import build_engine  # noqa: E402
from model_loader import load_model  # noqa: E402
from pruners import PruningAction  # noqa: E402
from reporting.headroom import (KL_FLOOR, PromptDamage, action_rows, damage, fit_predict, render,  # noqa: E402
                                routing_row, spearman)
from runtime.generation import generate  # noqa: E402

LOOKAHEAD_SETS = ("lookahead", "probe+lookahead")
SUMMARY_SETS = ("dense", "probe", "lookahead", "probe+lookahead")
log = logging.getLogger("lookahead")
PAIRS = (("ffn_neurons:0.2", "ffn_neurons:0.4"), ("attention_heads:0.2", "attention_heads:0.4"))


def damage_after(record: HeadroomRecord, ahead: LookaheadRecord, labels: list[str], predicted: str,
                 k: int) -> PromptDamage:
    """One prompt's damage on the reference after ``k`` (0: all of it), with the probe feature sets and, for
    k > 0, the log look-ahead KL of the ``predicted`` action alone and appended to the probe set."""
    features = dict(to_damage(record, labels).features)
    if k:
        own = math.log(max(ahead.lookahead_kl(predicted, k), KL_FLOOR))
        features.update({"lookahead": [own], "probe+lookahead": features["probe"] + [own]})
    return PromptDamage(log_ratio={a: ahead.after(a, k) for a in labels},
                        half_log_ratio={a: ahead.halves(a, k) for a in labels},
                        kl={a: ahead.after(a, k, "kl") for a in labels},
                        half_kl={a: ahead.halves(a, k, "kl") for a in labels}, features=features)


def report(sides: dict[str, list[tuple[HeadroomRecord, LookaheadRecord]]], labels: list[str]) -> str:
    """Per K (0 first): the damage/prediction table for every action and the equal-compute routing per target,
    each action predicted with its own look-ahead KL; then a summary of the 2r actions (the routed ones)."""
    out = []
    summary = ["### Summary: the routed actions (2r), held-out Spearman with the after-K log PPL ratio / share of the "
               "oracle's equal-compute gain over uniform r", "",
               "| K | action | sqrt(rel.) | " + " | ".join(SUMMARY_SETS) + " |", "|---|---|---|" + "---|" * len(SUMMARY_SETS)]
    for k in (0, *KS):
        sets = list(FEATURE_SETS) + (list(LOOKAHEAD_SETS) if k else [])
        data = {label: {side: [damage_after(r, a, labels, label, k) for r, a in pairs] for side, pairs in sides.items()}
                for label in labels}
        rows = [row for label in labels
                for row in action_rows(data[label]["train"], data[label]["held"], [label], sets)]
        routing = [routing_row(data[high]["train"], data[high]["held"], low, high, [(s, s, "log_ratio") for s in sets])
                   for low, high in PAIRS]
        title = ("K = 0: no look-ahead, the probe on the whole reference" if not k else
                 f"K = {k}: target = log PPL ratio of the reference after its first {k} tokens, look-ahead = "
                 f"the action's mean KL on those {k}")
        out += [f"### {title}", "", render(rows, routing, sets, len(sides["train"]), len(sides["held"])), ""]
        for g in routing:
            row = next(r for r in rows if r.label == g.high)
            summary.append(f"| {k} | {g.high} | {math.sqrt(max(row.reliability, 0.0)):.2f} | " + " | ".join(
                f"{row.prediction[s]:.2f} / {share_text(g.share(s))}" if s in row.prediction else "-" for s in SUMMARY_SETS)
                + " |")
    return "\n".join(out + summary)


def choose_k(train: dict[int, dict[str, list[PromptDamage]]], folds: int = 5, seed: int = 0) -> tuple[int, str]:
    """The look-ahead length the policy's ``--lookahead-tokens`` default takes, chosen on training prompts only:
    ``train[k][action]`` are the training prompts' after-k damages of each routed action with their look-ahead
    feature; the K whose feature best ranks that damage (mean over the actions of the ``folds``-fold
    cross-validated Spearman within the training split) wins. Returns (K, a table of the scores)."""
    from sklearn.model_selection import KFold

    scores: dict[int, dict[str, float]] = {}
    for k, by_action in train.items():
        scores[k] = {}
        for high, data in by_action.items():
            predicted = np.empty(len(data))
            for fit, out in KFold(folds, shuffle=True, random_state=seed).split(data):
                predicted[out] = fit_predict([data[i] for i in fit], [data[i] for i in out], "lookahead", high)
            scores[k][high] = spearman(predicted, damage(data, high))
    best = max(scores, key=lambda k: statistics.mean(scores[k].values()))
    actions = list(next(iter(train.values())))
    n = len(next(iter(next(iter(train.values())).values())))
    lines = [f"### Choosing K on the {n} training prompts ({folds}-fold cross-validated Spearman of the look-ahead "
             "KL with the after-K log PPL ratio)", "", "| K | " + " | ".join(actions) + " | mean |",
             "|---|" + "---|" * (len(actions) + 1)]
    lines += [f"| {k} | " + " | ".join(f"{scores[k][h]:.2f}" for h in actions)
              + f" | {statistics.mean(scores[k].values()):.2f} |" for k in scores]
    return best, "\n".join(lines + ["", f"chosen: K = {best} (the default of --lookahead-tokens)"])


def share_text(share: float) -> str:
    return "no oracle gain" if math.isnan(share) else f"{share:+.0%}"


def lookahead_cost(model, engine, records: list[HeadroomRecord], actions: list[PruningAction], tokens: int,
                   repeats: int) -> str:
    """Interleaved per prompt: a dense ``tokens``-token generation, then per K and action one pruned forward
    over prompt + K - 1 reference tokens with the KL on its K positions. The look-ahead's K dense decode steps
    are taken at that generation's own per-token decode time. Both run on torch's eager path (no governor or
    compiled decoder: the pruned forward is an eager one too). Medians over prompts, repeats and actions."""
    gross = {k: [] for k in KS}
    forward = {k: [] for k in KS}
    plain = []
    for record in tqdm(records, desc="look-ahead cost", unit="prompt"):
        prompt_ids, ref_ids = torch.tensor(record.prompt_ids), torch.tensor(record.ref_ids)
        for _ in range(repeats):
            engine.restore()
            gen = generate(model, prompt_ids.view(1, -1), tokens)
            plain.append(gen.total_s)
            for k, action in itertools.product(KS, actions):
                dense = score_reference(model, prompt_ids, ref_ids[:k])      # stands in for the decode's logits
                with engine.pruned(action):
                    started = time.perf_counter()
                    token_kl(dense, score_reference(model, prompt_ids, ref_ids[:k])).mean()
                    spent = time.perf_counter() - started
                forward[k].append(spent / gen.total_s)
                gross[k].append((k * gen.decode_s_per_token + spent) / gen.total_s)
    return "\n".join([f"look-ahead cost over {len(records)} prompts x {repeats} interleaved repeats, torch threads "
                      f"{torch.get_num_threads()}: dense {tokens}-token generation median "
                      f"{statistics.median(plain) * 1e3:.0f} ms; as a share of it (median):"]
                     + [f"- K = {k}: K dense decode steps + pruned forward {statistics.median(gross[k]):.1%}; the "
                        f"pruned forward alone (the extra when the K tokens are kept as output) "
                        f"{statistics.median(forward[k]):.1%}" for k in KS])


def shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise SystemExit(f"--shard {text!r}: give I/N with 0 <= I < N, e.g. --shard 0/2")
    return int(index), int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    record_set_arguments(parser, prompts=1000, prompts_help="prompts bench/headroom.py was asked for")
    parser.add_argument("--cache-dir", default=None, help="headroom records, read only (default: <cache>/headroom)")
    parser.add_argument("--lookahead-dir", default=None,
                        help="per-prompt look-ahead records (default: <cache>/headroom_lookahead)")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="print the report")
    parser.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the records that lack a look-ahead (--no-measure: report on those that have one)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="only measure every N-th record from the I-th, no report (N processes use N cores)")
    parser.add_argument("--cost-prompts", type=int, default=0, help="held-out prompts timed for the cost (0: none)")
    parser.add_argument("--cost-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    cfg = record_set_config(args)
    train, held = held_out_prompts(cfg, args.prompts, args.held_fraction)
    labels = list(ACTIONS)
    actions = [PruningAction.parse(a) for a in labels]
    loaded = load_model(cfg.model, device=cfg.device)
    engine = build_engine(cfg, loaded, actions)
    settings = {**engine_settings(cfg, loaded.name, loaded.source), "actions": labels}
    folder = Path(args.cache_dir or hub.cache_dir() / "headroom")
    sidecar = Path(args.lookahead_dir or hub.cache_dir() / "headroom_lookahead")
    started = time.perf_counter()
    # training and held-out prompts alternate, so a run stopped early leaves both sides measured
    order = [sp for pair in itertools.zip_longest([("train", p) for p in train], [("held", p) for p in held])
             for sp in pair if sp is not None]
    found = [(side, record_path(folder, settings, p)) for side, p in order]
    found = [(side, path, HeadroomRecord.from_dict(json.loads(path.read_text()))) for side, path in found
             if path.is_file()]
    if not found:
        raise SystemExit(f"no headroom records in {folder} for these settings: run bench/headroom.py first")
    if args.shard:
        index, count = shard(args.shard)
        measure_all(loaded.model, engine, [(path, r) for _, path, r in found[index::count]], actions, sidecar)
        return 0
    if args.report:
        measured = found if args.measure else [f for f in found if sidecar_path(sidecar, f[1]).is_file()]
        ahead = measure_all(loaded.model, engine, [(path, r) for _, path, r in measured], actions, sidecar)
        sides = {s: [(r, a) for (side, _, r), a in zip(measured, ahead) if side == s] for s in ("train", "held")}
        drift = max(abs(a.after(label) - math.log(r.outcomes.actions[label].ppl_ratio))
                    for pairs in sides.values() for r, a in pairs for label in labels)
        print(f"model {loaded.name} ({loaded.source}), engine {engine.describe()['importance']} / {cfg.allocation} / "
              f"{cfg.recovery}, references: {args.max_new_tokens}-token dense greedy, torch threads "
              f"{torch.get_num_threads()}, {time.perf_counter() - started:.0f} s")
        print(f"split: as bench/headroom.py (seed {args.seed}): {len(sides['train'])} training / "
              f"{len(sides['held'])} held-out prompts with records; whole-reference log PPL ratio from the look-ahead "
              f"forwards vs the record's: max |difference| {drift:.2e}\n")
        print(report(sides, labels))
        print("\n" + choose_k({k: {high: [damage_after(r, a, labels, high, k) for r, a in sides["train"]]
                                     for _, high in PAIRS} for k in KS})[1])
    if args.cost_prompts:
        log.info("timing the look-ahead on %d held-out prompts", args.cost_prompts)
        high = [PruningAction.parse(h) for _, h in PAIRS]
        timed = [r for side, _, r in found if side == "held"][:args.cost_prompts]
        print(lookahead_cost(loaded.model, engine, timed, high, args.cost_tokens, repeats=3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
