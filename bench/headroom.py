"""The headroom of per-prompt pruning on held-out Alpaca instructions (issue 27), and what the probe costs.

Per prompt: the dense greedy reference (``--max-new-tokens``), every action's log PPL ratio and token KL on
it (and on its two halves: split-half reliability), the probe features of the prefill that generated it and
the syntax features. Then (``reporting.headroom``) the damage table, held-out Spearman of ridge predictions
per feature set, and the equal-compute comparison (uniform r vs half at 2r: random, oracle, each predictor).

Prompts: the shared Alpaca instructions minus the calibration texts, split by a seeded hash of the text into
training (predictors fitted) and held-out (every figure) halves (``common.data.PromptSet.split``). Every
prompt is cached (``--cache-dir``), so a run can be stopped and resumed or grown.

    PYTHONPATH=. timeout 3h .venv/bin/python bench/headroom.py --model smollm2-135m --prompts 150
    PYTHONPATH=. .venv/bin/python bench/headroom.py --prompts 1000 --executor ray     # one actor per CPU
"""
from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import time
from pathlib import Path

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import torch  # noqa: E402

from common import hub  # noqa: E402
from common.calibration import calibration_set
from common.config import EXECUTORS, EnvConfig, RunConfig
from common.data import ALPACA_SUBSET, PromptSet, data_root, load_prompts, normalise
from environments.outcomes.fanout import ray_headroom
from environments.outcomes.headroom import HeadroomRecord, measure_headroom
from environments.live import PruningEnvironment
from environments.outcomes.cache import engine_settings
from environments.probe_features import probe_features
from environments.session import build_engine
from model_loader import load_model
from nlp_analyzer import PromptAnalyzer
from pruners import PruningAction
from pruners.scoring.probe import PrefillRecorder
from reporting.headroom import PromptDamage, action_rows, cross_action_spearman, render, routing_row
from runtime.generation import generate

log = logging.getLogger("headroom")

# Layer actions are left out here: their least-squares replacement maps take one more walk through every
# calibration text per layer (about 45 min on this shared 2-core machine); --layers adds them.
ACTIONS = ("ffn_neurons:0.2", "ffn_neurons:0.4", "attention_heads:0.2", "attention_heads:0.4")
LAYER_ACTIONS = ("transformer_layers:0.2", "transformer_layers:0.4")
FEATURE_SETS = ("nlp", "dense", "dense+lens", "inject", "probe")


def held_out_prompts(cfg: RunConfig, n: int, held_fraction: float) -> tuple[PromptSet, PromptSet]:
    """(train, held-out) Alpaca instructions that are not calibration texts, half each of ``n``."""
    calibration = {normalise(t) for t in calibration_set(cfg.calibration).texts}
    prompts = load_prompts(str(data_root() / ALPACA_SUBSET), seed=cfg.seed)
    fresh = PromptSet([p for p in prompts if normalise(p.text) not in calibration], prompts.source)
    train, held = fresh.split(test_fraction=held_fraction, seed=cfg.seed)
    n_held = round(n * held_fraction)
    return train.take(n - n_held), held.take(n_held)


def to_damage(record: HeadroomRecord, labels: list[str]) -> PromptDamage:
    probe = record.probe
    groups = {"dense": [k for k in probe if k.startswith("dense.")],
              "lens": [k for k in probe if k.startswith("lens")],
              "inject": [k for k in probe if k.startswith("inject.")]}
    feats = {"nlp": record.nlp, "dense": [probe[k] for k in groups["dense"]],
             "dense+lens": [probe[k] for k in groups["dense"] + groups["lens"]],
             "inject": [probe[k] for k in groups["inject"]], "probe": list(probe.values())}
    acts = record.outcomes.actions
    return PromptDamage(log_ratio={a: float(torch.tensor(acts[a].ppl_ratio).log()) for a in labels},
                        half_log_ratio={a: tuple(acts[a].half_log_ratio) for a in labels},
                        kl={a: acts[a].kl for a in labels}, half_kl={a: tuple(acts[a].half_kl) for a in labels},
                        features=feats)


def probe_cost(env: PruningEnvironment, records: list[HeadroomRecord], actions: list[PruningAction], tokens: int,
               repeats: int) -> str:
    """Interleaved per prompt: a plain ``tokens``-token generation, the same generation under the recorder, and
    the feature computation; medians of the (recorder - plain) + features overhead as a share of plain."""
    model, engine = env.model, env.engine
    engine.restore()
    shares, features_s, plain_s = [], [], []
    for record in records:
        ids = torch.tensor(record.prompt_ids).view(1, -1)
        for _ in range(repeats):
            started = time.perf_counter()
            generate(model, ids, tokens, decoder=env.decoder)
            plain = time.perf_counter() - started
            started = time.perf_counter()
            with PrefillRecorder(model) as recorder:
                generate(model, ids, tokens, decoder=env.decoder)
            recorded = time.perf_counter() - started
            started = time.perf_counter()
            probe_features(recorder.record, ids, engine, actions)
            feats = time.perf_counter() - started
            shares.append((recorded - plain + feats) / plain)
            features_s.append(feats)
            plain_s.append(plain)
    return (f"probe cost over {len(records)} prompts x {repeats} interleaved repeats: plain {tokens}-token generation "
            f"median {statistics.median(plain_s) * 1e3:.0f} ms; feature computation median "
            f"{statistics.median(features_s) * 1e3:.1f} ms; (recorder - plain + features) / plain median "
            f"{statistics.median(shares):+.1%} (target <= 5 %)")


def record_set_arguments(parser: argparse.ArgumentParser, prompts: int, prompts_help: str) -> None:
    """The flags that name a set of headroom records and how it runs (bench/lookahead.py reads the same set)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=prompts, help=prompts_help)
    parser.add_argument("--held-fraction", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="dense greedy reference length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")


def record_set_config(args: argparse.Namespace) -> RunConfig:
    """Logging, seed and threads set from ``record_set_arguments``' flags; the RunConfig the records are measured with."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    return RunConfig(model=args.model, seed=args.seed,
                     env=EnvConfig(max_new_tokens=args.max_new_tokens, min_reference_tokens=args.max_new_tokens))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    record_set_arguments(parser, prompts=150, prompts_help="prompts in all (training + held-out)")
    parser.add_argument("--cache-dir", default=None, help="per-prompt records (default: <project cache>/headroom)")
    parser.add_argument("--cost-prompts", type=int, default=5, help="prompts timed for the probe's cost (0: none)")
    parser.add_argument("--cost-tokens", type=int, default=32)
    parser.add_argument("--layers", action="store_true", help="also the transformer_layers actions")
    parser.add_argument("--executor", default="local", choices=EXECUTORS,
                        help="ray: prompts measured by Ray actors, one CPU and one torch thread each")
    parser.add_argument("--ray-address", default=None, help="--executor ray: a cluster (default: a local instance)")
    parser.add_argument("--workers", type=int, default=None, help="--executor ray: actors (default: the CPUs Ray sees)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop measuring new prompts after this long and report on those measured (0: report only)")
    args = parser.parse_args(argv)
    cfg = record_set_config(args)
    train, held = held_out_prompts(cfg, args.prompts, args.held_fraction)
    labels = list(ACTIONS) + (list(LAYER_ACTIONS) if args.layers else [])
    actions = [PruningAction.parse(a) for a in labels]
    loaded = load_model(cfg.model, device=cfg.device)
    engine = build_engine(cfg, loaded, actions)
    env = PruningEnvironment(loaded, engine, cfg.reward, cfg.env, record_prefill=True)   # the probe features read it
    analyzer = PromptAnalyzer("auto")
    settings = {**engine_settings(cfg, loaded.name, loaded.source), "actions": labels}
    folder = Path(args.cache_dir or hub.cache_dir() / "headroom")
    started = time.perf_counter()
    # training and held-out prompts alternate, so a run stopped by --minutes leaves both sides measured
    interleaved = [p for pair in itertools.zip_longest(train, held) for p in pair if p is not None]
    deadline = time.monotonic() + 60 * args.minutes if args.minutes is not None else None
    fanout = None
    if args.executor == "ray":
        def fanout(todo):
            return ray_headroom(cfg, todo, actions, cfg.offline.prompt_kl_tokens, analyzer.backend, args.ray_address,
                                args.workers)
    measured = dict(zip((p.id for p in interleaved),
                        measure_headroom(env, analyzer, interleaved, actions, folder, settings,
                                         cfg.offline.prompt_kl_tokens, deadline, fanout)))
    records = {side: [measured[p.id] for p in prompts if measured.get(p.id) is not None]
               for side, prompts in (("train", train), ("held", held))}
    data = {side: [to_damage(r, labels) for r in recs] for side, recs in records.items()}
    predictors = [(s, s, "log_ratio") for s in FEATURE_SETS] + [("probe (fit to log KL)", "probe", "kl")]
    routing = [routing_row(data["train"], data["held"], low, high, predictors)
               for low, high in zip(labels[::2], labels[1::2])]
    print(f"model {loaded.name} ({loaded.source}), engine {engine.describe()['importance']} / {cfg.allocation} / "
          f"{cfg.recovery}, references: {args.max_new_tokens}-token dense greedy, NLP backend {analyzer.backend}, "
          f"torch threads {torch.get_num_threads()}, measured in {time.perf_counter() - started:.0f} s")
    print(f"split: Alpaca minus calibration texts, seeded hash of the text (seed {args.seed}), "
          f"{len(records['train'])} training / {len(records['held'])} held-out measured "
          f"(of {len(train)} / {len(held)} asked)")
    print(render(action_rows(data["train"], data["held"], labels, FEATURE_SETS), routing, FEATURE_SETS,
                 len(data["train"]), len(data["held"])))
    pairs = [("ffn_neurons:0.2", "ffn_neurons:0.4"), ("ffn_neurons:0.4", "attention_heads:0.4"),
             ("ffn_neurons:0.2", "attention_heads:0.2")]
    print("\nshared factor, held-out Spearman: " + "; ".join(
        f"{a} ~ {b} {cross_action_spearman(data['held'], a, b):.2f}" for a, b in pairs))
    if args.cost_prompts:
        print(probe_cost(env, records["held"][:args.cost_prompts], actions, args.cost_tokens, repeats=3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
