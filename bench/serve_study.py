"""The serving study: who should pick the pruning action when requests arrive in bursts against a deadline.

Stages (each writes into --out-dir, later ones read earlier ones):
  table     the step-time table of the menu on the embedded model (serving.step_timing, the scheduler's batch code),
            and what same-action groups would cost if head and layer actions were chosen per request
  quality   PPL ratio and KL of every menu action against dense greedy 32-token references, per Alpaca prompt
            (chat-formatted, as served); the first half of the prompts fits the arms, the second half tests them
  sweep     the queueing simulator (environments.queueing.simulator) over arrival rates 0.5x-2x the dense arm's batched
            capacity, steady (Poisson) and bursty (on/off), training seeds to fit the rule and the best static
            per rate, test seeds to compare every arm: SLO attainment, goodput, mean served PPL ratio, CIs; the
            issue's above-capacity criterion computed from the bursty cells above 1x
  train     a Double DQN (gamma 0.99) in the simulator on the training seeds and prompts -> policy.pt; the sweep
            then scores it as the learned arm against each of slack, the fitted rule and the best static per rate
  overhead  one request, no queue: the server's end-to-end against the same generation called directly
  live      the live server (slack policy) on one bursty trace against the simulator's prediction of it
  soak      the live server in a process of its own for 10 minutes of bursty load at 1.5x the dense capacity: every
            accepted request answered, and its memory (RSS) flat over the second half

    PYTHONPATH=. .venv/bin/python bench/serve_study.py --stage table
    PYTHONPATH=. .venv/bin/python bench/serve_study.py --stage quality
    PYTHONPATH=. .venv/bin/python bench/serve_study.py --stage train
    PYTHONPATH=. .venv/bin/python bench/serve_study.py --stage sweep
    PYTHONPATH=. .venv/bin/python bench/serve_study.py --stage overhead
    PYTHONPATH=. .venv/bin/python bench/serve_study.py --stage live
    PYTHONPATH=. .venv/bin/python bench/serve_study.py --stage soak
"""
from __future__ import annotations

import sys

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

from common.files import strict_json  # noqa: E402
from common.config import RunConfig, ServeConfig  # noqa: E402
from common.data import ALPACA_SUBSET, data_root, load_prompts  # noqa: E402
from environments.queueing.policies import CACHE_SHAPING, RulePolicy, SlackPolicy, StaticPolicy, policy_actions  # noqa: E402
from environments.queueing.simulator import ServingSimulator, SimOutcome, SimRequest  # noqa: E402
from environments.queueing.step_table import StepTable  # noqa: E402
from pruners.actions import NONE, PruningAction  # noqa: E402
from tqdm import tqdm  # noqa: E402
from serving.load import bursty, poisson  # noqa: E402

log = logging.getLogger("serve_study")
# Width actions switch every step; head and layer actions shape the KV cache, so the scheduler switches them only
# when the running batch is empty (per batch: the table stage measures why not per-request groups).
MENU = ("none", "ffn_neurons:0.2", "ffn_neurons:0.3", "ffn_neurons:0.4", "ffn_neurons:0.5",
        "attention_heads:0.1", "attention_heads:0.2", "transformer_layers:0.1", "transformer_layers:0.2")
RATES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)      # x the dense arm's batched capacity: three points strictly above 1x
PATTERNS = ("poisson", "bursty")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", required=True, choices=("table", "quality", "train", "sweep", "overhead", "live", "soak"))
    p.add_argument("--out-dir", type=Path, default=Path("bench/serve"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=48, help="Alpaca prompts (half fit, half test)")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--slo-ttft-ms", type=float, help="default: from the table, 2 x max-batch x the dense prefill of "
                   "a mean prompt (fixed before the first sweep)")
    p.add_argument("--slo-tpot-ms", type=float, help="default: from the table, 1.2 x the dense step at batch "
                   "max-batch/2 (fixed before the first sweep)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of arrivals per simulated trace")
    p.add_argument("--train-seeds", type=int, default=3)
    p.add_argument("--test-seeds", type=int, default=5)
    p.add_argument("--contexts", default="64,128", help="table stage: context buckets (the study's chat prompts "
                   "plus 32 tokens stay under 128)")
    p.add_argument("--rounds", type=int, default=4, help="table stage: interleaved rounds per cell")
    p.add_argument("--train-duration", type=float, default=60.0, help="seconds of arrivals per training trace")
    p.add_argument("--epochs", type=int, default=2, help="passes of the DQN over the training traces")
    p.add_argument("--live-duration", type=float, default=60.0)
    p.add_argument("--overhead-pairs", type=int, default=8, help="overhead stage: interleaved (direct, served) pairs")
    p.add_argument("--live-rate", type=float, default=1.25, help="live stage: x the dense arm's capacity")
    p.add_argument("--soak-duration", type=float, default=600.0, help="soak stage: seconds of arrivals")
    p.add_argument("--soak-rate", type=float, default=1.5, help="soak stage: bursty arrivals at this x the dense "
                   "arm's capacity")
    p.add_argument("--soak-policy", help="soak stage: the server's --serve-policy (default: the arm with the most "
                   "goodput in the sweep's bursty cell nearest --soak-rate, or slack without a sweep)")
    p.add_argument("--soak-max-queue", type=int, default=ServeConfig().max_queue, help="soak stage: the server's "
                   "--max-queue (the server's default, so that the 429 path is exercised)")
    p.add_argument("--soak-sample-s", type=float, default=5.0, help="soak stage: seconds between RSS samples")
    p.add_argument("--flat-share", type=float, default=0.02, help="soak stage: memory is flat when the second half's "
                   "least-squares line grows by less than this share of the start RSS (fixed before the run)")
    p.add_argument("--calibration-samples", type=int, default=32, help="texts calibrating importance and compensation "
                   "(the CLI default, 512, takes ~30 min on a loaded 2-core machine)")
    return p.parse_args(argv)


def serve_config(args, table: StepTable | None = None, prompt_tokens: float = 64.0,
                 menu: tuple[str, ...] = MENU) -> ServeConfig:
    """The study's server; an SLO not given is set from the table (this machine, today), so that dense meets it
    at moderate load and misses it when the queue grows. ``menu``: the slack order (largest sub-network first)."""
    ttft, tpot = args.slo_ttft_ms, args.slo_tpot_ms
    if table is not None:
        ttft = ttft or 2 * args.max_batch * table.prefill_time("none", round(prompt_tokens)) * 1000
        tpot = tpot or 1.2 * table.step_s("none", max(1, args.max_batch // 2), round(prompt_tokens) + 16) * 1000
    return ServeConfig(max_batch=args.max_batch, max_queue=256, slo_ttft_ms=ttft or ServeConfig().slo_ttft_ms,
                       slo_tpot_ms=tpot or ServeConfig().slo_tpot_ms, actions=menu)


def slack_order(ppl_ratio: dict[str, list[float]], prompts: list[int]) -> tuple[str, ...]:
    """The menu from the best to the worst mean log PPL ratio on the fitting prompts: SlackFit's "largest
    sub-network first" when the menu mixes targets (an FFN fraction and a layer fraction are not comparable)."""
    def damage(label: str) -> float:
        return statistics.fmean(math.log(max(ppl_ratio[label][p], 1e-9)) for p in prompts)
    return tuple(sorted(MENU, key=lambda label: (label != "none", damage(label))))


# ---------------------------------------------------------------------------------------------- model stages
def study_run(args) -> RunConfig:
    run = RunConfig(model=args.model)
    return replace(run, calibration=replace(run.calibration, samples=args.calibration_samples))


def open_model(args):
    from environments.session import build_engine
    from model_loader import load_model
    from runtime.governor import ExecutionGovernor

    run = study_run(args)
    loaded = load_model(run.model, device="cpu")
    setting = ExecutionGovernor().govern()     # the measured thread rule: 2 threads on a loaded 2-core box collapse
    log.info("runtime %s (%s)", setting.label, setting.state)
    engine = build_engine(run, loaded, [PruningAction.parse(a) for a in MENU])
    return run, loaded, engine


def stage_table(args) -> dict:
    from serving.step_timing import measure_step_table, table_batches

    _run, loaded, engine = open_model(args)
    table = measure_step_table(loaded.model, engine, [PruningAction.parse(a) for a in MENU],
                               table_batches(args.max_batch), tuple(int(c) for c in args.contexts.split(",")),
                               vocab=int(loaded.model.config.vocab_size), rounds=args.rounds)
    table.meta.update(model=loaded.name, load_average=os.getloadavg(), switch_s=switch_time(engine))
    table.save(args.out_dir / "step_table.json")
    rows = {label: {f"b{b}": round(table.step_s(label, b, 100) * 1000, 1) for b in table.batches} for label in MENU}
    return {"switch_us": table.meta["switch_s"] * 1e6, "decode_ms_at_100_context": rows,
            "prefill_ms": {k: [round(v * 1000, 1) for v in vs] for k, vs in table.prefill_s.items()},
            "per_request_groups": group_costs(table, 100), "load_average": os.getloadavg()}


def group_costs(table: StepTable, context: int) -> dict[str, dict[str, float]]:
    """Why cache-shaping actions act per batch, not per request: a head or layer action chosen per request would
    split the batch into same-action groups, each its own forward (their caches differ in shape). Per action and
    batch size b: the cheapest split of b rows into k under the action plus b-k dense, and the whole batch under
    the action, both over one dense step of all b rows. A split above 1 costs more than serving everyone dense."""
    out = {}
    for label in MENU:
        if PruningAction.parse(label).target not in CACHE_SHAPING:
            continue
        out[label] = {}
        for b in (2, 4, table.batches[-1]):
            dense = table.step_s("none", b, context)
            split = min(table.step_s(label, k, context) + table.step_s("none", b - k, context) for k in range(1, b))
            out[label][f"b{b}"] = {"best_split": round(split / dense, 3),
                                   "whole_batch": round(table.step_s(label, b, context) / dense, 3)}
    return out


def switch_time(engine, repeats: int = 200) -> float:
    """Median seconds of one width-action switch (apply ffn 0.5, back to dense): the per-step decision's price."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.apply(PruningAction.parse("ffn_neurons:0.5"))
        engine.apply(NONE)
        times.append((time.perf_counter() - started) / 2)
    return statistics.median(times)


def chat_ids(tokenizer, text: str) -> list[int]:
    from serving.text import chat_prompt
    return chat_prompt(tokenizer, [("user", text)])


def stage_quality(args) -> dict:
    import torch

    from environments.outcomes.quality import mean_kl, ppl_ratio, score_reference
    from runtime.generation import generate

    _run, loaded, engine = open_model(args)
    texts = [p.text for p in load_prompts(str(data_root() / ALPACA_SUBSET), seed=1).prompts[:args.prompts]]
    out = {"prompts": texts, "prompt_tokens": [], "ppl_ratio": {a: [] for a in MENU}, "kl": {a: [] for a in MENU}}
    for text in tqdm(texts, desc="quality", unit="prompt"):
        ids = torch.tensor(chat_ids(loaded.tokenizer, text))
        out["prompt_tokens"].append(len(ids))
        engine.restore()
        ref = torch.tensor(generate(loaded.model, ids, args.output_tokens).tokens)
        dense = score_reference(loaded.model, ids, ref)
        for label in MENU:
            with engine.pruned(PruningAction.parse(label)):
                pruned = score_reference(loaded.model, ids, ref)
            out["ppl_ratio"][label].append(ppl_ratio(pruned, dense))
            out["kl"][label].append(mean_kl(dense, pruned))
    (args.out_dir / "quality.json").write_text(strict_json(out, indent=1))
    return {label: {"ppl_ratio_mean": statistics.fmean(out["ppl_ratio"][label]),
                    "kl_mean": statistics.fmean(out["kl"][label])} for label in MENU}


# ---------------------------------------------------------------------------------------------- simulation
def dense_capacity(table: StepTable, cfg: ServeConfig, prompt_tokens: float, output_tokens: int) -> float:
    """Requests per second the dense arm sustains with full batches: a batch's prefills plus its decode steps."""
    b = cfg.max_batch
    context = round(prompt_tokens + output_tokens / 2)
    generation = b * table.prefill_time("none", round(prompt_tokens)) + \
        (output_tokens - 1) * table.step_s("none", b, context)
    return b / generation


def trace(pattern: str, rate: float, duration: float, prompts: list[int], output_tokens: int, seed: int,
          lengths: list[int]) -> list[SimRequest]:
    make = poisson if pattern == "poisson" else bursty
    return [SimRequest(a.at_s, lengths[prompts[a.prompt]], output_tokens, prompts[a.prompt])
            for a in make(rate, duration, len(prompts), output_tokens, seed)]


def served_quality(outcome: SimOutcome, log_ratio: dict[str, list[float]]) -> float:
    """Geometric mean over the request's tokens of its prompt's PPL ratio under each token's action."""
    p = outcome.request.prompt
    return math.exp(statistics.fmean(log_ratio[a][p] for a in outcome.actions))


def score(outcomes: list[SimOutcome], duration: float, log_ratio) -> dict:
    met = sum(o.slo_met for o in outcomes)
    served = [served_quality(o, log_ratio) for o in outcomes if o.actions]
    return {"attainment": met / max(1, len(outcomes)), "goodput": met / duration,
            "ppl_ratio": statistics.fmean(served) if served else float("nan")}


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    from scipy import stats
    mean = statistics.fmean(diffs)
    if len(diffs) < 2 or statistics.pstdev(diffs) == 0:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class StudyInputs:
    """The table, the quality per (action, prompt), the server config (its ``actions`` in slack order), the prompt
    split (the first half fits, the second tests) and the dense arm's batched capacity."""
    table: StepTable
    quality: dict
    cfg: ServeConfig
    lengths: list[int]
    fit: list[int]
    test: list[int]
    capacity: float

    @property
    def menu(self) -> list[PruningAction]:
        return [PruningAction.parse(a) for a in self.cfg.actions]


def study_inputs(args) -> StudyInputs:
    table = StepTable.load(args.out_dir / "step_table.json")
    quality = json.loads((args.out_dir / "quality.json").read_text())
    missing = [a for a in MENU if a not in table.actions or a not in quality["ppl_ratio"]]
    if missing:
        raise ValueError(f"{args.out_dir}: the step table or quality.json lacks {', '.join(missing)}: run the table "
                         "and quality stages again")
    lengths = quality["prompt_tokens"]
    half = len(lengths) // 2
    fit = list(range(half))
    cfg = serve_config(args, table, statistics.fmean(lengths), slack_order(quality["ppl_ratio"], fit))
    capacity = dense_capacity(table, cfg, statistics.fmean(lengths), args.output_tokens)
    return StudyInputs(table, quality, cfg, lengths, fit, list(range(half, len(lengths))), capacity)


def stage_train(args) -> dict:
    from common.config import DQNConfig
    from controller.serving import ServeReward, mean_log_ratio, save_serving_policy, train_serving_policy

    inp = study_inputs(args)
    traces = [trace(pattern, mult * inp.capacity, args.train_duration, inp.fit, args.output_tokens, seed, inp.lengths)
              for pattern in PATTERNS for mult in RATES for seed in range(args.train_seeds)]
    reward = ServeReward(mean_log_ratio(inp.quality["ppl_ratio"], inp.fit), args.output_tokens)
    dqn = DQNConfig(gamma=0.99, buffer_size=100_000, batch_size=64, learning_starts=1000, train_frequency=4,
                    gradient_steps=1, epsilon_end=0.02, exploration_fraction=0.5, seed=0)
    sim = ServingSimulator(inp.table, inp.cfg, noise=0.1, seed=0)  # timing noise: a policy that needs exact times fails
    agent = train_serving_policy(sim, traces, inp.menu, reward, dqn, epochs=args.epochs)
    path = args.out_dir / "policy.pt"
    save_serving_policy(path, agent, inp.menu, inp.cfg, reward, dqn)
    return {"traces": len(traces), "transitions": agent.steps, "updates": agent.updates, "policy": str(path),
            "policy_bytes": path.stat().st_size, "menu": list(inp.cfg.actions)}


def contest(arm: list[dict], rival: list[dict]) -> dict:
    """``arm`` against ``rival`` on the same test seeds (paired): goodput and served PPL ratio differences with 95 %
    t intervals; ``beats``: more goodput (the interval above 0) at quality not significantly worse."""
    mean, lo, hi = t_interval([a["goodput"] - b["goodput"] for a, b in zip(arm, rival)])
    qmean, qlo, qhi = t_interval([a["ppl_ratio"] - b["ppl_ratio"] for a, b in zip(arm, rival)])
    goodput = "higher" if lo > 0 else "lower" if hi < 0 else "no difference in"
    quality = "better" if qhi < 0 else "worse" if qlo > 0 else "no difference in"
    return {"goodput_diff": [mean, lo, hi], "ppl_ratio_diff": [qmean, qlo, qhi],
            "verdict": f"{goodput} goodput, {quality} quality", "beats": bool(lo > 0 and qlo <= 0)}


def stage_sweep(args) -> dict:
    inp = study_inputs(args)
    log_ratio = {a: [math.log(max(r, 1e-9)) for r in inp.quality["ppl_ratio"][a]] for a in MENU}
    statics = {f"static:{a}" if a != "none" else "dense": StaticPolicy(PruningAction.parse(a)) for a in MENU}
    sim = ServingSimulator(inp.table, inp.cfg)
    learned = None
    if (args.out_dir / "policy.pt").is_file():
        from controller.serving import load_serving_policy
        learned = load_serving_policy(args.out_dir / "policy.pt")

    def run(policy, pattern, mult, seed, prompts) -> dict:
        requests = trace(pattern, mult * inp.capacity, args.duration, prompts, args.output_tokens, seed, inp.lengths)
        menu = policy.menu if policy is learned else policy_actions(policy, inp.menu)
        return score(sim.run(requests, policy, menu), args.duration, log_ratio)

    train_seeds = range(args.train_seeds)
    test_seeds = range(100, 100 + args.test_seeds)
    # the rule: one (depth, action) for every load, fitted on the training seeds and prompts by total goodput
    depths = sorted({2, 4, args.max_batch, args.max_batch + 4, 2 * args.max_batch, 3 * args.max_batch, 4 * args.max_batch})
    rules = [RulePolicy(d, PruningAction.parse(a)) for d in depths for a in MENU[1:]]

    def fit_score(r: RulePolicy) -> float:
        """Goodput summed over the training cells; a hundredth of a request/s per unit of PPL ratio breaks ties."""
        scores = [run(r, pat, m, s, inp.fit) for pat in PATTERNS for m in RATES for s in train_seeds]
        return sum(x["goodput"] - 0.01 * x["ppl_ratio"] for x in scores)
    fit = {r.name: fit_score(r) for r in tqdm(rules, desc="fitting the rule", unit="rule")}
    rule = max(rules, key=lambda r: fit[r.name])
    log.info("fitted rule %s", rule.name)
    cells = {}
    for pattern, mult in tqdm([(p, m) for p in PATTERNS for m in RATES], desc="sweep", unit="cell"):
        train = {name: statistics.fmean(run(p, pattern, mult, s, inp.fit)["goodput"] for s in train_seeds)
                 for name, p in statics.items()}
        best_static = max(train, key=train.get)
        arms = {**statics, "slack": SlackPolicy(inp.table), "rule": rule}
        if learned is not None:
            arms["dqn"] = learned
        per_seed = {name: [run(p, pattern, mult, s, inp.test) for s in test_seeds] for name, p in arms.items()}
        summary = {name: {k: statistics.fmean(r[k] for r in rows) for k in ("attainment", "goodput", "ppl_ratio")}
                   for name, rows in per_seed.items()}
        cell = {"rate_rps": mult * inp.capacity, "best_static_on_training": best_static, "arms": summary}
        # slack against the strongest non-learned rival on the test seeds; the learned policy against each of slack,
        # the rule and the best static of the training seeds (the three), paired by seed
        strongest = max(["dense", best_static, "rule"], key=lambda n: summary[n]["goodput"])
        cell["slack"] = {"rival": strongest, **contest(per_seed["slack"], per_seed[strongest])}
        if learned is not None:
            cell["dqn"] = {rival: contest(per_seed["dqn"], per_seed[rival]) for rival in ("slack", "rule", best_static)}
        cells[f"{pattern}@{mult}x"] = cell
    result = {"dense_capacity_rps": inp.capacity, "fitted_rule": rule.name, "slack_order": list(inp.cfg.actions),
              "slo": [inp.cfg.slo_ttft_ms, inp.cfg.slo_tpot_ms], "max_batch": inp.cfg.max_batch,
              "duration_s": args.duration, "test_seeds": len(test_seeds), "train_seeds": len(train_seeds),
              "cells": cells, "table_meta": inp.table.meta}
    result["above_capacity"] = above_capacity(result)
    (args.out_dir / "sweep.json").write_text(strict_json(result, float, indent=1))
    plot(result, args.out_dir)
    return result


def above_capacity(result: dict, target: float = 0.9, dense_below: float = 0.6) -> dict:
    """The issue's criterion, computed: at a bursty load strictly above the dense capacity, does the best arm (the
    most SLO attainment; the better served quality on a tie) hold >= ``target`` where dense holds < ``dense_below``?"""
    rows = {}
    for name, cell in result["cells"].items():
        pattern, mult = name.split("@")
        if pattern != "bursty" or float(mult[:-1]) <= 1.0:
            continue
        arms = cell["arms"]
        best = max(arms, key=lambda a: (arms[a]["attainment"], -arms[a]["ppl_ratio"]))
        rows[name] = {"dense": arms["dense"]["attainment"], "best_arm": best, "best": arms[best]["attainment"],
                      "best_ppl_ratio": arms[best]["ppl_ratio"],
                      "holds": bool(arms[best]["attainment"] >= target and arms["dense"]["attainment"] < dense_below)}
    return {"criterion": f"best arm >= {target:.0%} SLO attainment where dense < {dense_below:.0%}", "cells": rows,
            "met_at": [name for name, row in rows.items() if row["holds"]]}


def learned_verdict(result: dict) -> str:
    """One line: where the learned policy beats slack, the rule and the best static together, or that it does not."""
    cells = {name: cell["dqn"] for name, cell in result["cells"].items() if "dqn" in cell}
    if not cells:
        return "no learned policy was scored (run the train stage first)."
    everywhere = [name for name, c in cells.items() if all(v["beats"] for v in c.values())]
    counts = {"slack": 0, "rule": 0, "best static": 0}
    for c in cells.values():
        for rival, v in c.items():
            counts[rival if rival in ("slack", "rule") else "best static"] += v["beats"]
    per = ", ".join(f"{rival} in {n}" for rival, n in counts.items())
    if everywhere:
        return f"the learned policy beats slack, the rule and the best static together at {', '.join(everywhere)} " \
               f"(more goodput, quality not worse, 95 % CIs); one by one it beats {per} of {len(cells)} cells."
    return f"the learned policy beats slack, the rule and the best static together in none of the {len(cells)} " \
           f"cells; one by one it beats {per}."


def render_sweep(result: dict) -> str:
    """The sweep as markdown: attainment / goodput / mean served PPL ratio per arm and cell, then the verdicts."""
    cells = result["cells"]
    arms = list(next(iter(cells.values()))["arms"])
    lines = [f"dense batched capacity {result['dense_capacity_rps']:.3f} requests/s (max batch {result['max_batch']}); "
             f"SLO: first token {result['slo'][0]:.0f} ms, then {result['slo'][1]:.0f} ms per token; fitted rule "
             f"{result['fitted_rule']}; slack order {', '.join(result['slack_order'])}; {result['test_seeds']} test "
             f"seeds x {result['duration_s']:.0f} s per cell ({result['train_seeds']} training seeds fit the rule and "
             "the best static). Cells: SLO attainment / goodput (requests/s) / mean served PPL ratio.", "",
             "| load | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for name, cell in cells.items():
        row = [f"{cell['arms'][a]['attainment']:.2f} / {cell['arms'][a]['goodput']:.2f} / "
               f"{cell['arms'][a]['ppl_ratio']:.2f}" for a in arms]
        lines.append(f"| {name} ({cell['rate_rps']:.2f} rps; best static on training: "
                     f"{cell['best_static_on_training']}) | " + " | ".join(row) + " |")
    lines += ["", "| load | arm | rival | goodput diff [95% CI] | PPL ratio diff [95% CI] | verdict |",
              "|---|---|---|---|---|---|"]
    for name, cell in cells.items():
        contests = [("slack", cell["slack"]["rival"] + " (strongest)", cell["slack"])]
        contests += [("dqn", rival, c) for rival, c in cell.get("dqn", {}).items()]
        for arm, rival, c in contests:
            g, q = c["goodput_diff"], c["ppl_ratio_diff"]
            lines.append(f"| {name} | {arm} | {rival} | {g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}] | "
                         f"{q[0]:+.3f} [{q[1]:+.3f}, {q[2]:+.3f}] | {c['verdict']} |")
    above = result["above_capacity"]
    lines += ["", f"Bursty load above the dense capacity ({above['criterion']}): " + "; ".join(
        f"{name} dense {row['dense']:.2f}, best {row['best_arm']} {row['best']:.2f} at PPL ratio "
        f"x{row['best_ppl_ratio']:.2f}" for name, row in above["cells"].items()) +
        (f" -> met at {', '.join(above['met_at'])}." if above["met_at"] else " -> met at no rate above 1x."),
        "", "Learned policy: " + learned_verdict(result)]
    return "\n".join(lines)


def plot(result: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for pattern, ax in zip(PATTERNS, axes[:2]):
        cells = {k: v for k, v in result["cells"].items() if k.startswith(pattern)}
        mults = [float(k.split("@")[1][:-1]) for k in cells]
        for i, arm in enumerate(next(iter(cells.values()))["arms"]):
            ax.plot(mults, [c["arms"][arm]["attainment"] for c in cells.values()], marker="o", label=arm,
                    color=plt.cm.tab20(i % 20))
        ax.set(title=f"{pattern}: SLO attainment", xlabel="arrival rate / dense capacity", ylabel="attainment")
    axes[0].legend(fontsize=6)
    for cell in result["cells"].values():
        for i, (arm, s) in enumerate(cell["arms"].items()):
            axes[2].scatter(s["attainment"], s["ppl_ratio"], s=10, color=plt.cm.tab20(i % 20))
    axes[2].set(title="served quality vs attainment (colours as left)", xlabel="attainment", ylabel="mean PPL ratio",
                yscale="log")
    fig.tight_layout()
    fig.savefig(out_dir / "serve_study.png", dpi=110)


# ---------------------------------------------------------------------------------------------- live stages
def live_server(args, policy: str, table: Path | None, cfg: ServeConfig | None = None):
    import uvicorn

    from serving.server import open_server

    cfg = replace(cfg or serve_config(args), policy=policy, step_table=str(table) if table else None)
    server = open_server(study_run(args), cfg)       # loads the model and builds its one engine
    runner = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.05)
    return server, runner, thread, f"http://127.0.0.1:{runner.servers[0].sockets[0].getsockname()[1]}"


def stage_overhead(args) -> dict:
    """One request, no queue: the server's end-to-end against ``generate`` called directly, interleaved.

    The server runs in a process of its own (``serving.soak.server_process``), as deployed: with the server on a
    thread of this process, the client, uvicorn's loop and the scheduler's worker share one GIL, and that run
    measured 1.083 where the scheduler's batch step alone measured 1.005 against ``generate``. Both sides use the
    governor's thread rule."""
    import openai
    import torch

    from model_loader import load_model
    from runtime.generation import generate
    from runtime.governor import ExecutionGovernor
    from reporting.summaries import bootstrap_ci
    from runtime.dtype import set_kernel
    from runtime.matvec import matvec_kernel
    from serving.soak import scrape, server_process

    serve_args = ["--model", args.model, "--serve-policy", "dense", "--calibration-samples", str(args.calibration_samples)]
    # the server first, so that its governor decides on a machine this process is not loading a model on
    with server_process(serve_args) as (_proc, url):
        loaded = load_model(args.model, device="cpu")
        set_kernel(loaded.model, matvec_kernel(RunConfig().matvec))     # the server's default decode kernel
        setting = ExecutionGovernor().govern()
        log.info("runtime %s (%s)", setting.label, setting.state)
        text = load_prompts(str(data_root() / ALPACA_SUBSET), seed=1).prompts[0].text
        ids = torch.tensor(loaded.tokenizer(text).input_ids)
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        parts: dict[str, list[tuple[float, float]]] = {"direct": [], "streamed": []}   # (first token s, median step s)

        def direct_run() -> None:
            result = generate(loaded.model, ids, args.output_tokens)
            parts["direct"].append((result.prefill_s, result.median_step_s))

        def streamed_run() -> None:
            started, stamps = time.perf_counter(), []
            for _chunk in api.completions.create(model=loaded.name, prompt=text, max_tokens=args.output_tokens,
                                                 stream=True, extra_body={"ignore_eos": True}):
                stamps.append(time.perf_counter())
            parts["streamed"].append((stamps[0] - started, statistics.median(b - a for a, b in zip(stamps, stamps[1:]))))

        runs = {"direct": direct_run,
                "served": lambda: api.completions.create(model=loaded.name, prompt=text, max_tokens=args.output_tokens,
                                                         extra_body={"ignore_eos": True}),
                "streamed": streamed_run}
        times: dict[str, list[float]] = {side: [] for side in runs}
        for pair in range(args.overhead_pairs + 1):       # the first pair is a warm-up
            # counterbalanced: whichever runs later in a pair inherits the others' cache and thread state
            for side in ("direct", "served", "streamed") if pair % 2 == 0 else ("streamed", "served", "direct"):
                started = time.perf_counter()
                runs[side]()
                times[side].append(time.perf_counter() - started)
        counters = scrape(url)
    direct, served = times["direct"][1:], times["served"][1:]
    split = {side: {"first_token_ms": 1e3 * statistics.median(p[0] for p in rows[1:]),
                    "step_ms": 1e3 * statistics.median(p[1] for p in rows[1:])} for side, rows in parts.items()}
    ratios = [s / d for s, d in zip(served, direct)]
    decisions = counters.get("serve_decision_seconds_count", 0.0)
    return {"direct_s": direct, "served_s": served, "median_ratio": statistics.median(ratios),
            "median_ratio_direct_first": statistics.median(ratios[1::2] or [math.nan]),
            "median_ratio_served_first": statistics.median(ratios[0::2] or [math.nan]),
            "geomean_ratio_ci95": {k: math.exp(v) for k, v in bootstrap_ci([math.log(r) for r in ratios]).items()
                                   if k != "n"},
            "streamed_over_direct": statistics.median(s / d for s, d in zip(times["streamed"][1:], direct)),
            "first_token_and_step": split,
            # the server's own view (arrival to first token, mean per later token), all requests incl. the warm-up
            "server_side": {"first_token_ms": 1e3 * counters.get("serve_time_to_first_token_seconds_sum", 0.0)
                            / max(counters.get("serve_time_to_first_token_seconds_count", 0.0), 1.0),
                            "step_ms": 1e3 * counters.get("serve_time_per_output_token_seconds_sum", 0.0)
                            / max(counters.get("serve_time_per_output_token_seconds_count", 0.0), 1.0)},
            "decisions": decisions, "decision_ms_per_step": 1e3 * counters.get("serve_decision_seconds_sum", 0.0)
            / max(decisions, 1.0), "direct_runtime": setting.label, "load_average": os.getloadavg()}


def stage_live(args) -> dict:
    from serving.load import run_load

    table_path = args.out_dir / "step_table.json"
    inp = study_inputs(args)
    cfg, lengths = inp.cfg, inp.lengths
    arrivals = bursty(args.live_rate * inp.capacity, args.live_duration, len(lengths), args.output_tokens, seed=7)
    server, runner, thread, url = live_server(args, "slack", table_path, cfg)
    try:
        records = asyncio.run(run_load(url, server.loaded.name, arrivals, inp.quality["prompts"], cfg.slo_ttft_ms,
                                       cfg.slo_tpot_ms, timeout_s=600))
    finally:
        runner.should_exit = True
        thread.join(120)
    requests = [SimRequest(a.at_s, lengths[a.prompt], a.output_tokens, a.prompt) for a in arrivals]
    simulated = ServingSimulator(inp.table, cfg).run(requests, SlackPolicy(inp.table), inp.menu)
    live_att = sum(r.slo_met for r in records) / len(records)
    sim_att = sum(o.slo_met for o in simulated) / len(simulated)
    live_tokens = [a for r in records for a in r.actions]
    sim_tokens = [a for o in simulated for a in o.actions]
    result = {"rate_rps": args.live_rate * inp.capacity, "requests": len(records), "live_attainment": live_att,
              "simulated_attainment": sim_att, "error": sim_att - live_att,
              "live_ttft_p50": statistics.median([r.ttft_s for r in records if r.ttft_s is not None] or [math.nan]),
              "sim_ttft_p50": statistics.median([o.ttft for o in simulated if o.ttft is not None] or [math.nan]),
              "live_actions": {a: live_tokens.count(a) for a in set(live_tokens)},
              "sim_actions": {a: sim_tokens.count(a) for a in set(sim_tokens)}, "load_average": os.getloadavg()}
    (args.out_dir / "live.json").write_text(strict_json(result, indent=1))
    return result


def soak_policy(args) -> str:
    """--soak-policy, else the sweep's strongest arm (most goodput) in the bursty cell nearest the soak's rate."""
    path = args.out_dir / "sweep.json"
    if args.soak_policy or not path.is_file():
        return args.soak_policy or "slack"
    sweep = json.loads(path.read_text())
    cells = {float(name.split("@")[1][:-1]): cell for name, cell in sweep["cells"].items() if name.startswith("bursty@")}
    arms = cells[min(cells, key=lambda m: abs(m - args.soak_rate))]["arms"]
    best = max(arms, key=lambda a: arms[a]["goodput"])
    return {"rule": sweep["fitted_rule"], "dqn": str((args.out_dir / "policy.pt").resolve())}.get(best, best)


def stage_soak(args) -> dict:
    """The server in a process of its own (its RSS alone), bursty arrivals at --soak-rate x the dense capacity."""
    from serving.soak import run_soak

    inp = study_inputs(args)
    cfg = inp.cfg
    policy = soak_policy(args)
    arrivals = bursty(args.soak_rate * inp.capacity, args.soak_duration, len(inp.lengths), args.output_tokens, seed=11)
    serve_args = ["--model", args.model, "--serve-policy", policy, "--step-table", str((args.out_dir / "step_table.json").resolve()),
                  "--serve-actions", ",".join(cfg.actions), "--max-batch", str(cfg.max_batch),
                  "--max-queue", str(args.soak_max_queue), "--slo-ttft-ms", f"{cfg.slo_ttft_ms:.1f}",
                  "--slo-tpot-ms", f"{cfg.slo_tpot_ms:.1f}", "--calibration-samples", str(args.calibration_samples)]
    load_before = os.getloadavg()
    result = run_soak(serve_args, args.model, arrivals, inp.quality["prompts"], cfg.slo_ttft_ms, cfg.slo_tpot_ms,
                      sample_s=args.soak_sample_s, flat_share=args.flat_share,
                      timeout_s=max(900.0, 2 * args.soak_duration))
    result = {"policy": policy, "rate_rps": args.soak_rate * inp.capacity, "rate_x_capacity": args.soak_rate,
              "duration_s": args.soak_duration, "max_queue": args.soak_max_queue, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), **result}
    (args.out_dir / "soak.json").write_text(strict_json(result, indent=1))
    return {k: v for k, v in result.items() if k != "rss_samples"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stage = {"table": stage_table, "quality": stage_quality, "train": stage_train, "sweep": stage_sweep,
             "overhead": stage_overhead, "live": stage_live, "soak": stage_soak}[args.stage]
    started = time.time()
    result = stage(args)
    result = {"stage": args.stage, "wall_s": round(time.time() - started, 1), **result}
    print(render_sweep(result) if args.stage == "sweep" else strict_json(result, str, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
