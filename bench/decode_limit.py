"""How far is decode from what the machine allows? Per action and load level, against the action's own floor.

For dense and every action (default: every target at 0.1/0.2/0.3), on the idle machine and under
each load level of ``machine.contention.presets()``:

- ``floor``: the bandwidth floor, the matrix-vector products over exactly the matrices that action
  reads per token (every projection of the kept layers as the engine has narrowed it, copied without
  gaps in the model's weight layout; the tied lm_head; the K/V cache as [heads x length, head_dim]
  matrices), same threads;
- ``read``: reading those same bytes once (``sum``), the floor of any kernel on this memory system;
- ``ms/tok``: achieved decode step (median), ``ach/floor``, ``speedup`` vs dense and ``ideal`` (bytes
  read, dense / pruned) from the same interleaved rounds (dense, action, exported, floors, per round);
- ``export``: the physically pruned copy (``pruners.export.pruned_model``) for structural actions that
  export (uniform shapes), its ms/token and view/export ratio (1.00 = the prefix views cost nothing);
- ``runtime``: the governor's setting (wait policy / threads / decoder); per level, the dense model
  in child processes under that setting and under the pre-governor one (passive, every core), in
  alternating pairs (``--reference-pairs``), for the done-when check "no slower than passive".

The OpenMP policy is the one ``runtime.openmp`` measured for this machine (set before torch
loads, as in the CLI); threads follow the governor's rule for the state telemetry reads.

    PYTHONPATH=. .venv/bin/python bench/decode_limit.py --json bench/decode_limit.json
    PYTHONPATH=. .venv/bin/python bench/decode_limit.py --levels idle --compile   # + inductor decode on CPU
"""
from __future__ import annotations

import sys

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import model_loader  # noqa: E402
from bench.script import bench_main  # noqa: E402
from common.files import atomic_write_text  # noqa: E402
from runtime.compiled import CompiledDecoder  # noqa: E402
from machine.contention import contention, presets  # noqa: E402
from runtime.generation import eager_decoder, generate  # noqa: E402
from common.config import RunConfig  # noqa: E402
from runtime.governor import ExecutionGovernor  # noqa: E402
from environments.session import build_engine  # noqa: E402
from runtime.timing import RunTiming, SideTimings, TimingSession  # noqa: E402
from pruners import NONE, PRUNE_TARGETS, PruningAction, PruningEngine, get_target  # noqa: E402
from pruners.export import ExportError, pruned_model  # noqa: E402

log = logging.getLogger("bench.decode_limit")


@dataclass
class Row:
    level: str
    action: str
    runtime: str
    floor_ms: float
    read_ms: float
    ms_per_token: float
    achieved_over_floor: float
    speedup: float
    ideal_speedup: float
    export_ms: float | None
    view_over_export: float | None
    cache_tokens: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--levels", default=",".join(presets()), help="comma-separated contention presets")
    p.add_argument("--targets", default=",".join(PRUNE_TARGETS), help="comma-separated; empty: dense only")
    p.add_argument("--intensities", default="0.1,0.2,0.3")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for non-KV actions")
    p.add_argument("--kv-prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per action")
    p.add_argument("--floor-passes", type=int, default=5, help="matvec passes per floor timing")
    p.add_argument("--reference-pairs", type=int, default=2,
                   help="child-process pairs (governor setting, passive/all cores) per level")
    p.add_argument("--compile", action="store_true", help="also time the inductor-compiled decode step (CPU: slow)")
    p.add_argument("--importance", default=None, help="default: the CLI's (magnitude on a random model)")
    p.add_argument("--allocation", default=RunConfig.allocation, choices=("global", "uniform"))
    p.add_argument("--recovery", default=RunConfig.recovery, choices=("compensate", "none"))
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def dense_copy(weight: torch.Tensor) -> torch.Tensor:
    """A gap-free copy in the weight's own layout (row- or column-major, model_loader.set_weight_layout)."""
    return weight.t().contiguous().t() if weight.stride(0) == 1 and weight.shape[1] > 1 else weight.contiguous()


def read_matrices(model: nn.Module, cache_tokens: int, head_dim: int) -> list[torch.Tensor]:
    """Gap-free copies of every matrix one decode step reads in the model's current (pruned) state."""
    layers = model.model.layers        # as the pruned model runs them: a replaced run is a ReplacedRun (layer + map)
    mats = [dense_copy(m.weight) for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        kv_heads = getattr(layer, "layer", layer).self_attn.k_proj.weight.shape[0] // head_dim     # kept KV heads
        mats += [torch.randn(kv_heads * cache_tokens, head_dim) for _ in range(2)]   # K and V
    return mats + [model.lm_head.weight]


@torch.inference_mode()
def floor_s(mats: list[torch.Tensor], passes: int) -> tuple[float, float]:
    """(median matvec pass over ``mats``, median pure read of the same bytes), in seconds."""
    xs = [torch.randn(1, m.shape[1]) for m in mats]

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(passes):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    return (timed(lambda: [nn.functional.linear(x, m) for x, m in zip(xs, mats)]),
            timed(lambda: [m.sum() for m in mats]))


def exported(engine: PruningEngine, action: PruningAction) -> nn.Module | None:
    if not get_target(action.target).removes_weights:
        return None
    try:
        return pruned_model(engine, action)
    except ExportError as err:
        log.info("%s: no export (%s)", action.label, str(err).split(":")[0])
        return None


def time_level(level: str, engine: PruningEngine, actions: list[PruningAction], args, prompts: dict,
               governor: ExecutionGovernor) -> tuple[list[Row], dict]:
    """All actions under one load level, each in interleaved rounds of dense, action, export and floors."""
    model = engine.model
    setting = governor.govern()
    session = TimingSession(setting)
    decoder = governor.decoder(model, engine)

    def gen(m: nn.Module, ids: torch.Tensor, with_engine: bool = True) -> RunTiming:
        return RunTiming.of(generate(m, ids, args.new_tokens, engine=engine if with_engine else None,
                                     decoder=decoder if m is model else eager_decoder))

    rows, dense_floor = [], []
    for action in tqdm(actions, desc=f"decode limit [{level}]", leave=False):
        ids = prompts["kv" if get_target(action.target).while_generating else "short"]
        copy = exported(engine, action)
        with engine.pruned(action):
            cache = generate(model, ids, 2, engine=engine).cache_tokens_after_prune + args.new_tokens // 2
            mats = read_matrices(model, cache, engine.dims.head_dim)
        dense_mats = read_matrices(model, ids.shape[1] + args.new_tokens // 2, engine.dims.head_dim)
        sides = {k: SideTimings() for k in ("dense", "pruned", "export")}
        floors, dense_floors = [], []
        for _ in range(args.rounds):
            sides["dense"].runs.append(session.time(("dense", ids.shape[1]), lambda: gen(model, ids, False)))
            with engine.pruned(action):
                sides["pruned"].runs.append(session.time(action.label, lambda: gen(model, ids)))
            if copy is not None:
                sides["export"].runs.append(session.time(("export", action.label), lambda: gen(copy, ids, False)))
            floors.append(floor_s(mats, args.floor_passes))
            dense_floors.append(floor_s(dense_mats, args.floor_passes)[0])
        dense_floor += dense_floors
        pruned_s = sides["pruned"].decode_per_token_s
        floor, read = statistics.median(f for f, _ in floors), statistics.median(r for _, r in floors)
        export_s = sides["export"].decode_per_token_s if copy is not None else None
        rows.append(Row(level, action.label, setting.label, floor * 1e3, read * 1e3, pruned_s * 1e3, pruned_s / floor,
                        sides["dense"].decode_per_token_s / pruned_s,
                        engine.ideal_speedup(action, ids.shape[1], args.new_tokens / 2),
                        None if export_s is None else export_s * 1e3,
                        None if export_s is None else pruned_s / export_s, cache))
        del copy, mats
    dense_row = next(r for r in rows if r.action == NONE.label)
    governed, passive = reference_pairs(setting, args)
    summary = {"level": level, "runtime": setting.label, "state": setting.state,
               "dense_ms": dense_row.ms_per_token, "dense_floor_ms": statistics.median(dense_floor) * 1e3,
               "child_governed_ms": statistics.median(governed) * 1e3,
               "child_passive_all_cores_ms": statistics.median(passive) * 1e3,
               "vs_passive": statistics.median(governed) / statistics.median(passive),
               "child_runs_ms": {"governed": [x * 1e3 for x in governed], "passive": [x * 1e3 for x in passive]},
               "loadavg_1m": round(os.getloadavg()[0], 2)}
    return rows, summary


def reference_pairs(setting, args) -> tuple[list[float], list[float]]:
    """Dense decode s/token in child processes, alternating the governor's setting (its policy, threads
    and weight layout) with the pre-governor one (passive, every core, row-major); the level's load
    runs around them."""
    cores, governed, passive = openmp.usable_cores(), [], []
    policy = next((p for p in openmp.POLICIES if p.name == setting.wait_policy), None)
    layout = openmp.active().layout
    for _ in range(args.reference_pairs):
        if policy is not None:
            governed.append(openmp.run_probe(policy, (setting.threads,), args.model, args.new_tokens, 20.0,
                                             states=(openmp.IDLE,), layout=layout)[openmp.IDLE][setting.threads])
        passive.append(openmp.run_probe(openmp.REFERENCE, (cores,), args.model, args.new_tokens, 20.0,
                                        states=(openmp.IDLE,))[openmp.IDLE][cores])
    return governed or [float("nan")], passive


def compile_probe(engine: PruningEngine, ids: torch.Tensor, args) -> list[dict]:
    """Eager vs inductor-compiled decode (CPU): capture time and interleaved ms/token, dense and one FFN action."""
    decoder = CompiledDecoder(engine.model, engine)
    out = []
    for label in (NONE.label, "ffn_neurons:0.3"):
        action = PruningAction.parse(label)
        session = TimingSession()
        with engine.pruned(action):
            pair = session.compare(
                lambda _: RunTiming.of(generate(engine.model, ids, args.new_tokens, engine=engine)),
                lambda _: RunTiming.of(generate(engine.model, ids, args.new_tokens, engine=engine, decoder=decoder)),
                range(args.rounds), pruned_side="compiled", dense_side="eager")
        capture = next(c for k, c in decoder.captures.items() if k.startswith(label + "@"))
        out.append({"action": label, "eager_ms": pair.dense.decode_per_token_s * 1e3,
                    "compiled_ms": pair.pruned.decode_per_token_s * 1e3, "gain": pair.decode_speedup,
                    "capture_s": capture.seconds})
        log.info("compile %s: eager %.1f ms, compiled %.1f ms, capture %.0f s", label, out[-1]["eager_ms"],
                 out[-1]["compiled_ms"], capture.seconds)
    return out


def run(args: argparse.Namespace) -> dict:
    loaded = model_loader.load_model(args.model, device="cpu")
    intensities = [float(x) for x in args.intensities.split(",")]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    actions = [NONE] + [PruningAction(t, r) for t in targets for r in intensities]
    # The menu the controller chooses from: the CLI's engine (importance, allocation, compensation, calibration).
    importance = args.importance or (RunConfig.importance if loaded.source != "random" else "magnitude")
    engine = build_engine(RunConfig(importance=importance, allocation=args.allocation, recovery=args.recovery),
                          loaded, actions)
    vocab = loaded.model.config.vocab_size
    prompts = {"short": (torch.arange(args.prompt_tokens)[None] * 7919) % (vocab - 1) + 1,
               "kv": (torch.arange(args.kv_prompt_tokens)[None] * 7919) % (vocab - 1) + 1}
    governor = ExecutionGovernor()
    known = presets()
    started = time.time()
    result = {"settings": {"model": loaded.name, "source": loaded.source, "dtype": str(loaded.model.dtype),
                           "engine": engine.describe(),
                           "openmp": {k: v for k, v in governor.choice.to_dict().items() if k != "probes"},
                           "new_tokens": args.new_tokens, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
                           "kv_prompt_tokens": args.kv_prompt_tokens, "torch": torch.__version__,
                           "platform": platform.platform(), "cpu": openmp.cpu_model(), "cores": openmp.usable_cores(),
                           "wall_s": 0.0},
              "levels": [], "rows": [], "compile": None, "partial": True}
    for name in (s.strip() for s in args.levels.split(",") if s.strip()):
        with contention(known[name]):
            level_rows, summary = time_level(name, engine, actions, args, prompts, governor)
        result["rows"] += [asdict(r) for r in level_rows]
        result["levels"].append(summary)
        result["settings"]["wall_s"] = round(time.time() - started, 1)
        log.info("level %s: dense %.1f ms/token under %s; children: %.1f governed, %.1f passive/all cores", name,
                 summary["dense_ms"], summary["runtime"], summary["child_governed_ms"],
                 summary["child_passive_all_cores_ms"])
        if args.json:   # a long run on a shared machine keeps what it has measured
            atomic_write_text(args.json, json.dumps(result, indent=1))
    result["compile"] = compile_probe(engine, prompts["short"], args) if args.compile else None
    result["settings"]["wall_s"] = round(time.time() - started, 1)
    result["partial"] = False
    return result


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _engine(described: dict | None) -> str:
    if not described:
        return "uniform activation, no compensation"      # files written before the engine was recorded
    return f"{described['importance']} importance, {described['allocation']} allocation, recovery {described['recovery']}"


def format_tables(result: dict) -> str:
    s = result["settings"]
    omp = s["openmp"]
    lines = [f"{s['model']} ({s['source']}), {s['dtype']}, {s['cores']} cores ({s['cpu']}), torch {s['torch']}; "
             f"OpenMP policy {omp['policy']} ({omp['source']}; threads idle/busy {omp['threads_idle']}/"
             f"{omp['threads_busy']}; {omp.get('layout', 'row')}-major weights); engine "
             f"{_engine(s.get('engine'))}; {s['new_tokens']} new tokens, "
             f"{s['rounds']} interleaved rounds; prompt "
             f"{s['prompt_tokens']} tokens (KV actions {s['kv_prompt_tokens']}); {s['wall_s']} s"]
    cols = ("action", "floor", "read", "ms/tok", "ach/floor", "speedup", "ideal", "export", "view/exp", "cache")
    for level in result["levels"]:
        lines += ["", f"[{level['level']}] runtime {level['runtime']} ({level['state']}); "
                  f"dense {level['dense_ms']:.1f} ms/token, floor {level['dense_floor_ms']:.1f}; child processes: "
                  f"governed {level['child_governed_ms']:.1f} vs passive/all cores "
                  f"{level['child_passive_all_cores_ms']:.1f} "
                  f"(x{level['vs_passive']:.2f}); load avg {level['loadavg_1m']}",
                  " | ".join(cols), " | ".join("-" * len(c) for c in cols)]
        for r in (r for r in result["rows"] if r["level"] == level["level"]):
            lines.append(" | ".join((r["action"], f"{r['floor_ms']:.1f}", f"{r['read_ms']:.1f}",
                                     f"{r['ms_per_token']:.1f}", f"{r['achieved_over_floor']:.2f}",
                                     f"{r['speedup']:.3f}x", f"{r['ideal_speedup']:.3f}x", _f(r["export_ms"], ".1f"),
                                     _f(r["view_over_export"], ".2f"), str(r["cache_tokens"]))))
    if result.get("compile"):
        lines += ["", "compiled decode step on CPU (inductor): action | eager ms | compiled ms | gain | capture s"]
        lines += [f"{c['action']} | {c['eager_ms']:.1f} | {c['compiled_ms']:.1f} | {c['gain']:.3f}x | "
                  f"{c['capture_s']:.0f}" for c in result["compile"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run, format_tables)


if __name__ == "__main__":
    main()
