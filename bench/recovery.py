"""Issue 15: is every pruning level worth choosing? Calibration data, global allocation, compensation.

Stages (each appends rows to --out, a JSON file; rows already there are skipped, so a stage resumes):

- ``select``: the defaults, chosen on held-out *calibration-domain* text only (Alpaca instructions that
  are not in any calibration sample, packed into 512-token windows): PPL ratio pruned / dense for
  importance x allocation x recovery. WikiText-2 is never used to choose anything.
- ``table``: the issue's protocol on WikiText-2 test (first --windows windows of --seq-len tokens, the
  same windows for every row) for four settings - today (uniform activation, the 8 calibration
  sentences), + calibration (~21k tokens), + global allocation, + compensation (the new defaults) - and
  with --tasks (limit --limit) LAMBADA / ARC-Easy accuracy at --task-intensities for today and the
  defaults; plus each action's
  extra bytes, ideal decode speedup (bytes read per token) and apply + restore time.
- ``calibration``: PPL ratio against calibration size (~250 / 4k / 16k / 64k tokens) for the defaults
  (FFN and heads at 0.2: a layer row needs a least-squares walk per size, too slow on this CPU).
- ``heads-calibration``: heads 0.2 at ~16k and ~64k calibration tokens for each allocation x recovery, with
  each plan's KV groups per layer (why heads 0.2 worsens at 64k tokens), and the same 64k tokens packed
  into long texts.
- ``speed``: measured decode speedup / ideal of the defaults' plans (interleaved pairs), SmolLM2 and the
  random Llama-3.2-1B-shape model (non-uniform plans must still reach >= 0.9 of ideal).
- ``heal``: the "+ healing" rows of the ``table`` stage for a ``--mode heal`` folder (``--healed DIR``): the
  healed sub-networks' WikiText-2 PPL over the *original* dense model's (same windows as every row), the
  healed full model's ratio (the "within 1 %" check) and the heal run's tokens and wall time from its
  sidecar (heal.json) with its held-out KL by step; ``--heal-intensities`` limits the actions (CPU time);
  ``--held-out FILE`` adds every action's KL to the original model on one run's held-out continuations
  (``heal-validation.pt``): several heal runs scored on one file compare on text none of them trained on.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/recovery.py --stage table --tasks lambada_openai,arc_easy
    .venv/bin/python bench/recovery.py --stage heal --healed .cache/heal/smollm2-135m
    .venv/bin/python bench/recovery.py --markdown          # the tables of bench/RESULTS.md from the JSON
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.calibration import ALPACA, CALIBRATION_SENTENCES, SENTENCES  # noqa: E402
from common.config import CalibrationConfig, EvalConfig, HealConfig, RunConfig  # noqa: E402
from common.data import ALPACA_SUBSET, data_root, load_prompts  # noqa: E402
from common.files import atomic_write_bytes, strict_json  # noqa: E402
from common.markdown import fmt, md_table  # noqa: E402

log = logging.getLogger("bench.recovery")
TARGETS = ("ffn_neurons", "attention_heads", "transformer_layers")
INTENSITIES = (0.1, 0.2, 0.3)
DEFAULT = RunConfig()
LEGACY_CALIBRATION = CalibrationConfig(dataset=SENTENCES, samples=len(CALIBRATION_SENTENCES))
HELD_OUT_FROM = 10_000      # Alpaca instructions from this seeded position on are in no calibration sample
HEALED = "+ healing"


@dataclass(frozen=True)
class Setting:
    """One engine configuration (the RunConfig fields that shape the menu)."""
    name: str
    importance: str
    allocation: str
    recovery: str
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)

    def run_config(self) -> RunConfig:
        return dataclasses.replace(DEFAULT, importance=self.importance, allocation=self.allocation,
                                   recovery=self.recovery, calibration=self.calibration)


TABLE_SETTINGS = (
    Setting("today", "activation", "uniform", "none", LEGACY_CALIBRATION),
    Setting("+ calibration", "activation", "uniform", "none"),
    Setting(f"+ global allocation ({DEFAULT.importance})", DEFAULT.importance, "global", "none"),
    Setting("+ compensation (default)", DEFAULT.importance, DEFAULT.allocation, DEFAULT.recovery),
)


def select_settings() -> list[Setting]:
    return [Setting(f"{imp}/{alloc}/{rec}", imp, alloc, rec) for imp in ("activation", "fluctuation")
            for alloc in ("uniform", "global") for rec in ("none", "compensate")]


def calibration_sizes() -> list[Setting]:
    """~250, ~4k, ~16k and ~64k calibration tokens on SmolLM2's tokenizer (bench prints the exact counts)."""
    sizes = [LEGACY_CALIBRATION] + [dataclasses.replace(CalibrationConfig(), samples=n) for n in (88, 340, 4096)]
    return [Setting(f"{c.dataset} x{c.samples}", DEFAULT.importance, DEFAULT.allocation, DEFAULT.recovery, c)
            for c in sizes]


def heads_calibration_settings() -> list[Setting]:
    """Heads 0.2 at ~16k and ~64k calibration tokens for each allocation x recovery: which part of the engine
    goes wrong at 64k (the KV-group allocation, or the compensation biases)."""
    return [setting for n in (340, 4096)
            for setting in _heads_variants(f"x{n}", dataclasses.replace(CalibrationConfig(), samples=n))]


def _heads_variants(label: str, calibration: CalibrationConfig) -> list[Setting]:
    """The four allocation x recovery settings of one calibration set."""
    return [Setting(f"{alloc}/{rec} {label}", DEFAULT.importance, alloc, rec, calibration)
            for alloc in ("global", "uniform") for rec in ("compensate", "none")]


def packed_settings(tokenizer) -> list[Setting]:
    """The ~64k set's words in long texts: its Alpaca instructions joined into texts of <= 250 tokens (the
    built-in prompts as they are). Same tokens, long contexts: is it the text length that moves heads?"""
    from common.calibration import calibration_set
    from common.data import BUILTIN
    from common.hub import cache_dir
    n_builtin = len(calibration_set(CalibrationConfig(dataset=BUILTIN, samples=4096)).texts)
    short = calibration_set(CalibrationConfig(dataset=ALPACA, samples=4096 - n_builtin)).texts   # those of x4096
    packed, current, used = [], [], 0
    for text in short:
        n = len(tokenizer(text + "\n\n").input_ids)
        if current and used + n > 250:
            packed.append("\n\n".join(current))
            current, used = [], 0
        current.append(text)
        used += n
    packed += ["\n\n".join(current)] if current else []
    path = cache_dir() / "bench" / "alpaca-4096-packed.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps({"instruction": t}) + "\n" for t in packed).encode()
    atomic_write_bytes(path, lambda fh: fh.write(payload))
    calibration = CalibrationConfig(dataset=f"{BUILTIN},{path}", samples=n_builtin + len(packed))
    return _heads_variants("x4096 packed", calibration)


# ------------------------------------------------------------------ measurements

class Bench:
    """The model, the texts and the JSON store of one benchmark run."""

    def __init__(self, args: argparse.Namespace) -> None:
        from evaluation.wikitext import load_wikitext2_test
        from model_loader import load_model
        self.args = args
        self.loaded = load_model(args.model, device=args.device)
        self.out = Path(args.out)
        stored = json.loads(self.out.read_text()) if self.out.is_file() else {"rows": []}
        same = {k: stored.get("meta", {}).get(k) for k in ("windows", "seq_len")}
        if stored["rows"] and same != {"windows": args.windows, "seq_len": args.seq_len}:
            raise SystemExit(f"{self.out} holds rows of {same}: pass the same --windows/--seq-len, or another --out")
        self.rows: list[dict] = stored["rows"]
        self.wikitext = load_wikitext2_test(args.wikitext_path)
        self.held_out = _held_out_corpus()
        self._dense: dict[str, float] = {}

    def has(self, stage: str, setting: str, action: str) -> bool:
        return any(r["stage"] == stage and r["setting"] == setting and r["action"] == action for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        meta = {"model": self.loaded.name, "windows": self.args.windows, "seq_len": self.args.seq_len,
                "limit": self.args.limit}
        payload = strict_json({"meta": meta, "rows": self.rows}, indent=1).encode()
        atomic_write_bytes(self.out, lambda fh: fh.write(payload))
        log.info("%s | %s | %s: %s", row["stage"], row["setting"], row["action"],
                 {k: v for k, v in row.items() if k not in ("stage", "setting", "action", "engine")})

    def ppl(self, corpus) -> float:
        from evaluation.wikitext import compute_perplexity
        return compute_perplexity(self.loaded.model, self.loaded.tokenizer, corpus, seq_len=self.args.seq_len,
                                  max_windows=self.args.windows, progress=False).ppl

    def dense_ppl(self, which: str) -> float:
        if which not in self._dense:
            self._dense[which] = self.ppl(self.wikitext if which == "wikitext" else self.held_out)
        return self._dense[which]

    def engine(self, setting: Setting, actions: list):
        """A fresh copy of the model with the setting's engine (statistics come from the disk cache)."""
        from environments.session import build_engine
        from model_loader import LoadedModel
        loaded = LoadedModel(copy.deepcopy(self.loaded.model), self.loaded.tokenizer, self.loaded.name,
                             self.loaded.source)
        started = time.perf_counter()
        engine = build_engine(setting.run_config(), loaded, actions)
        log.info("%s: engine ready in %.0f s", setting.name, time.perf_counter() - started)
        return loaded, engine

    def ratios(self, stage: str, setting: Setting, actions: list, corpus_name: str) -> None:
        todo = [a for a in actions if not self.has(stage, setting.name, a.label)]
        if not todo:
            return
        loaded, engine = self.engine(setting, todo)
        corpus = self.wikitext if corpus_name == "wikitext" else self.held_out
        from evaluation.wikitext import compute_perplexity
        dense = self.dense_ppl(corpus_name)
        for action in todo:
            with engine.pruned(action):
                ppl = compute_perplexity(loaded.model, loaded.tokenizer, corpus, seq_len=self.args.seq_len,
                                         max_windows=self.args.windows, progress=False).ppl
            row = {"stage": stage, "setting": setting.name, "action": action.label, "corpus": corpus_name,
                   "ppl": ppl, "dense_ppl": dense, "ppl_ratio": ppl / dense}
            if stage == "table":
                row.update(self.costs(engine, action))
            if stage in ("table", "calibration", "heads_calibration"):
                row["engine"] = engine.describe([action])
            if stage == "heads_calibration":
                row["kept_per_layer"] = _kept_per_layer(engine, action)
            self.add(row)
        del loaded, engine

    def costs(self, engine, action) -> dict:
        """Extra bytes of the compensation, ideal decode speedup, apply + restore median (us)."""
        from bench.pruning_speed import median_us

        def switch() -> None:
            engine.apply(action)
            engine.restore()
        switch()                 # builds the cached views and swaps once
        apply_restore_us = median_us(switch, 50, next(engine.model.parameters()).device)
        described = engine.describe([action])["extra_bytes"][action.label]
        return {"extra_bytes": described["bytes"], "extra_share": described["share_of_model"],
                "ideal_speedup": engine.ideal_speedup(action, 128, 16),
                "apply_restore_us": apply_restore_us,
                "effective_intensity": engine.effective_intensity(action)}

    def tasks(self, setting: Setting, actions: list) -> None:
        """lm-eval accuracy (the evaluation package's own code path) for dense and the setting's actions."""
        tasks = tuple(t for t in self.args.tasks.split(",") if t)
        todo = [a for a in actions if not self.has("tasks", setting.name, a.label)]
        need_dense = not self.has("tasks", "dense", "none")
        if not tasks or not (todo or need_dense):
            return
        loaded, engine = self.engine(setting, todo)
        self._task_rows(setting.name, "dense", loaded, engine, todo, need_dense)

    def _task_rows(self, name: str, dense_name: str, loaded, engine, actions: list, with_dense: bool) -> None:
        """lm-eval rows of ``actions`` on ``engine`` (setting ``name``), and of its full model as ``dense_name``."""
        from evaluation.suite import run_evaluation
        config = EvalConfig(wikitext=False, tasks=tuple(t for t in self.args.tasks.split(",") if t),
                            eval_limit=self.args.limit, speed_probe=False, progress=False)
        specs = (["dense"] if with_dense else []) + [f"static:{a.label}" for a in actions]
        for spec in specs:      # one model per call: each row is stored as soon as it is scored (resume)
            block = run_evaluation(loaded, [spec], config, engine=engine)
            for label, entry in block["models"].items():
                accs = {t: s.get("acc") for t, s in entry["tasks"].items()}
                accs.update({f"{t}_norm": s.get("acc_norm") for t, s in entry["tasks"].items() if s.get("acc_norm")})
                self.add({"stage": "tasks", "setting": dense_name if label == "dense" else name,
                          "action": entry["action"] or "none", **accs})

    def speed(self, setting: Setting, actions: list, model_name: str) -> None:
        """Measured decode speedup (median over interleaved dense/pruned pairs) against the ideal."""
        from runtime.generation import generate
        todo = [a for a in actions if not self.has("speed", f"{setting.name} [{model_name}]", a.label)]
        if not todo:
            return
        if model_name == self.loaded.name:
            loaded, engine = self.engine(setting, todo)
        else:   # random weights (speed only): a small calibration is enough to shape the plans
            from environments.session import build_engine
            from model_loader import load_model
            loaded = load_model(model_name, device=self.args.device)
            cfg = dataclasses.replace(setting.run_config(), calibration=CalibrationConfig(samples=16))
            engine = build_engine(cfg, loaded, todo)
        vocab = loaded.model.config.vocab_size
        import torch
        prompt = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(0))
        new = self.args.speed_new_tokens
        for action in todo:
            generate(loaded.model, prompt, 4, ignore_eos=True)
            pairs = []
            for _ in range(self.args.speed_pairs):
                dense = generate(loaded.model, prompt, new, ignore_eos=True).median_step_s
                with engine.pruned(action):
                    pruned = generate(loaded.model, prompt, new, engine=engine, ignore_eos=True).median_step_s
                pairs.append(dense / pruned)
            ideal = engine.ideal_speedup(action, 128, new / 2)
            measured = statistics.median(pairs)
            self.add({"stage": "speed", "setting": f"{setting.name} [{model_name}]", "action": action.label,
                      "speedup": measured, "ideal_speedup": ideal, "achieved_over_ideal": measured / ideal,
                      "kept": _kept(engine, action), "kept_per_layer": _kept_per_layer(engine, action)})


    def healed(self, folder: str, actions: list, task_actions: list) -> None:
        """The "+ healing" rows: a healed folder's sub-networks against the original dense model's PPL, and
        with --tasks their lm-eval accuracy (``task_actions`` and the healed full model)."""
        from environments.session import build_engine
        from evaluation.wikitext import compute_perplexity
        from model_loader import load_model
        name = healed_setting(folder)
        todo = [a for a in actions if not self.has("table", name, a.label)]
        full_todo = not self.has("heal", name, "none")
        tasks_todo = self.args.tasks and (not self.has("tasks", f"{name} (full model)", "none")
                                          or any(not self.has("tasks", name, a.label) for a in task_actions))
        kl_todo = self.args.held_out and not any(
            r["stage"] == "heldout" and r["setting"] == name and r["held_out"]["file"] == str(Path(self.args.held_out))
            for r in self.rows)
        if not (todo or full_todo or tasks_todo or kl_todo):
            return
        loaded = load_model(folder, device=self.args.device)
        engine = build_engine(dataclasses.replace(DEFAULT, model=folder), loaded, [*actions, *task_actions])
        healed = engine.describe()["healed"]
        if not healed:
            raise SystemExit(f"{folder} is not a --mode heal folder (no elastic.pt sidecar)")
        dense = self.dense_ppl("wikitext")
        meta = {"folder": folder, "heal_steps": healed.get("steps"), "heal_tokens": healed.get("tokens"),
                "heal_wall_s": healed.get("wall_s"), "heal_tokens_per_s": healed.get("tokens_per_s")}
        info = engine.menu.info          # heal.json, as the engine loaded it with the sidecar
        validation = info.get("validation")

        def ppl() -> float:
            return compute_perplexity(loaded.model, loaded.tokenizer, self.wikitext, seq_len=self.args.seq_len,
                                      max_windows=self.args.windows, progress=False).ppl
        if full_todo:
            value = ppl()
            self.add({"stage": "heal", "setting": name, "action": "none", "corpus": "wikitext", "ppl": value,
                      "dense_ppl": dense, "ppl_ratio": value / dense, "heal_validation": validation, **meta})
        for action in todo:
            with engine.pruned(action):
                value = ppl()
            self.add({"stage": "table", "setting": name, "action": action.label, "corpus": "wikitext", "ppl": value,
                      "dense_ppl": dense, "ppl_ratio": value / dense, **self.costs(engine, action), **meta,
                      "engine": engine.describe([action])})
        if kl_todo:
            self._held_out_kl(name, info.get("heal", {}).get("seq_len", 128), loaded, engine, actions)
        task_actions = [a for a in task_actions if not self.has("tasks", name, a.label)]
        full = not self.has("tasks", f"{name} (full model)", "none")
        if self.args.tasks and (task_actions or full):
            self._task_rows(name, f"{name} (full model)", loaded, engine, task_actions, full)


    def _held_out_kl(self, name: str, seq_len: int, loaded, engine, actions: list) -> None:
        """Each healed action's KL to the original dense model on ``--held-out`` (a heal run's stored
        continuations, cut into ``seq_len`` windows, the heal run's): the same prompts for several heal runs, so
        their corpora compare on text none of them trained on."""
        from pruners import NONE
        from pruners.recovery.healing import load_corpus, mean_kl
        windows, corpus = load_corpus(Path(self.args.held_out), seq_len, loaded.tokenizer.eos_token_id)
        kls = mean_kl(loaded.model, self.loaded.model, windows, [NONE, *actions], engine.pruned, batch_size=4)
        engine.restore()
        for label, kl in kls.items():
            self.add({"stage": "heldout", "setting": name, "action": label, "kl": kl, "held_out": corpus})


def healed_setting(folder: str) -> str:
    """The rows' setting name of one heal run, by its budget and, when not the default, its corpus' prompts
    (several heal runs can share one --out)."""
    from pruners.recovery.elastic import HEAL_JSON
    path = Path(folder) / HEAL_JSON
    if not path.is_file():
        raise SystemExit(f"{folder} is not a --mode heal folder (no {HEAL_JSON}): heal first with --mode heal")
    info = json.loads(path.read_text())
    prompts = info.get("corpus", {}).get("prompts", HealConfig().samples)
    corpus = "" if prompts == HealConfig().samples else f", {prompts} prompts"
    return f"{HEALED} ({info.get('steps')} steps, {info.get('tokens')} tokens{corpus})"


def validation_table(records: list[dict]) -> list[str]:
    """The heal run's KL to the teacher (nats/token) per check: held out / on as many training windows."""
    labels = [a for a in records[0]["held_out"] if a != "none"]
    shown = [a for a in labels if a.endswith(":0.2")]

    def pair(record: dict, label: str | None) -> str:
        def value(part: str) -> float:
            kls = record[part]
            return kls[label] if label else sum(kls[a] for a in labels) / len(labels)
        return f"{max(value('held_out'), 0.0):.3f} / {max(value('train'), 0.0):.3f}"    # -1e-9 from rounding: 0
    table = [[str(r["step"]), pair(r, "none"), *(pair(r, a) for a in shown), pair(r, None)] for r in records]
    return ["KL to the dense teacher (nats/token), held-out prompts / as many training windows:", "",
            *md_table(["step", "full model", *shown, f"mean of {len(labels)} actions"], table), ""]


def held_out_table(rows: list[dict]) -> list[str]:
    """The heal runs' KL to the original dense model on one held-out file (``--held-out``)."""
    labels = sorted({r["action"] for r in rows if r["action"] != "none"}, key=_action_order)
    shown = [a for a in labels if a.endswith(":0.2")]
    table = []
    for name, file in dict.fromkeys((r["setting"], r["held_out"]["file"]) for r in rows):
        mine = [r for r in rows if r["setting"] == name and r["held_out"]["file"] == file]
        kl = {r["action"]: r["kl"] for r in mine}
        corpus = mine[0]["held_out"]
        table.append([name, f"`{file}` ({corpus['tokens']} tokens)", fmt(kl.get("none"), 3),
                      *(fmt(kl.get(a), 3) for a in shown), fmt(statistics.fmean(kl[a] for a in labels if a in kl), 3)])
    return ["### KL to the original dense model on held-out continuations (nats/token)", "",
            *md_table(["setting", "held-out file", "full model", *shown, f"mean of {len(labels)} actions"], table), ""]


def _kept(engine, action) -> str:
    plan = engine.plan(action)
    for name, values in (("ffn", plan.ffn_kept), ("kv groups", plan.kv_groups_kept)):
        if values:
            return f"{name} {min(values)}..{max(values)}"
    return f"layers {len(plan.layers_kept)}" if plan.layers_kept else ""


def _kept_per_layer(engine, action) -> list[int]:
    """The plan in full: kept FFN channels or KV groups per layer, or the kept layers' indices."""
    plan = engine.plan(action)
    return list(plan.ffn_kept or plan.kv_groups_kept or plan.layers_kept or ())


def _held_out_corpus():
    """Alpaca instructions no calibration sample contains, joined: the domain of the calibration data."""
    from evaluation.wikitext import CorpusText
    import hashlib
    prompts = load_prompts(str(data_root() / ALPACA_SUBSET)).prompts[HELD_OUT_FROM:HELD_OUT_FROM + 4000]
    text = "\n\n".join(p.text for p in prompts)
    return CorpusText(text, f"held-out {ALPACA}", hashlib.sha256(text.encode()).hexdigest())


# ------------------------------------------------------------------ stages

def run(args: argparse.Namespace) -> None:
    from pruners import PruningAction
    bench = Bench(args)
    actions = [PruningAction(t, r) for t in TARGETS for r in INTENSITIES]
    if args.stage in ("select", "all"):
        for setting in select_settings():
            bench.ratios("select", setting, actions, "held_out")
    if args.stage in ("table", "all"):
        for setting in TABLE_SETTINGS:
            bench.ratios("table", setting, actions, "wikitext")
        task_actions = [PruningAction(t, float(r)) for t in TARGETS for r in args.task_intensities.split(",")]
        for action in task_actions:     # today and the defaults (CPU time), side by side per action
            for setting in (TABLE_SETTINGS[0], TABLE_SETTINGS[-1]):
                bench.tasks(setting, [action])
    if args.stage in ("calibration", "all"):
        for setting in calibration_sizes():
            bench.ratios("calibration", setting, [PruningAction(t, 0.2) for t in TARGETS[:2]], "wikitext")
    if args.stage == "heads-calibration":
        for setting in heads_calibration_settings() + packed_settings(bench.loaded.tokenizer):
            bench.ratios("heads_calibration", setting, [PruningAction("attention_heads", 0.2)], "wikitext")
    if args.stage == "heal":
        if not args.healed:
            raise SystemExit("--stage heal needs --healed DIR (a folder written by --mode heal)")
        bench.healed(args.healed, [PruningAction(t, float(r)) for t in TARGETS for r in args.heal_intensities.split(",")],
                     [PruningAction(t, float(r)) for t in TARGETS for r in args.task_intensities.split(",")])
    if args.stage in ("speed", "all"):
        default = TABLE_SETTINGS[-1]
        for name in (n for n in args.speed_models.split(",") if n):
            model_name = bench.loaded.name if name in (args.model, bench.loaded.name) else name
            bench.speed(default, [PruningAction(t, 0.2) for t in TARGETS], model_name)


# ------------------------------------------------------------------ tables

def markdown(data: dict) -> str:
    """The tables of bench/RESULTS.md (every number from the JSON)."""
    rows, meta, out = data["rows"], data["meta"], []
    select = [r for r in rows if r["stage"] == "select"]
    if select:
        labels = sorted({r["action"] for r in select}, key=_action_order)
        names = list(dict.fromkeys(r["setting"] for r in select))
        table = [[name, *(fmt(_get(select, name, a, "ppl_ratio"), 3) for a in labels),
                  fmt(_geomean([_get(select, name, a, "ppl_ratio") for a in labels]), 3)] for name in names]
        out += ["### Selection on held-out calibration-domain text (Alpaca, PPL ratio pruned / dense)", "",
                *md_table(["importance/allocation/recovery", *labels, "geomean"], table), ""]
    table_rows = [r for r in rows if r["stage"] == "table"]
    if table_rows:
        labels = sorted({r["action"] for r in table_rows}, key=_action_order)
        names = list(dict.fromkeys(r["setting"] for r in table_rows))
        table = [[name, *(fmt(_get(table_rows, name, a, "ppl_ratio"), 2) for a in labels)] for name in names]
        out += [f"### WikiText-2 PPL ratio pruned / dense (first {meta['windows']} windows of {meta['seq_len']} "
                "tokens)", "", *md_table(["setting", *labels], table), ""]
        for full in (r for r in rows if r["stage"] == "heal" and r["action"] == "none"):
            out += [f"**{full['setting']}**: `{full['folder']}`, {full['heal_steps']} steps on {full['heal_tokens']} "
                    f"tokens in {fmt(full['heal_wall_s'], 0)} s ({fmt(full['heal_tokens_per_s'], 0)} tokens/s); ratios "
                    f"over the original dense PPL; the healed full model: PPL {fmt(full['ppl'], 2)}, ratio "
                    f"{fmt(full['ppl_ratio'], 4)}.", ""]
            if full.get("heal_validation"):
                out += validation_table(full["heal_validation"])
        # the cost table: the training-free default
        default = ([n for n in names if not n.startswith(HEALED)] or names)[-1]
        cost = [[a, fmt(_get(table_rows, default, a, "effective_intensity"), 3),
                 fmt(_get(table_rows, default, a, "ideal_speedup"), 3),
                 fmt((_get(table_rows, default, a, "extra_bytes") or 0) / 1e6, 2),
                 fmt(100 * (_get(table_rows, default, a, "extra_share") or 0), 2),
                 fmt(_get(table_rows, default, a, "apply_restore_us"), 0)] for a in labels]
        out += [f"### Cost of each action ({default})", "",
                *md_table(["action", "removed", "ideal speedup (x)", "extra MB", "extra % of model",
                           "apply+restore (us)"], cost), ""]
    tasks = [r for r in rows if r["stage"] == "tasks"]
    if tasks:
        metrics = sorted({k for r in tasks for k in r if k not in ("stage", "setting", "action")})
        table = [[r["setting"], r["action"], *(fmt(r.get(m), 3) for m in metrics)] for r in tasks]
        out += [f"### lm-eval accuracy (first {meta['limit']} documents per task)", "",
                *md_table(["setting", "action", *metrics], table), ""]
    calib = [r for r in rows if r["stage"] == "calibration"]
    if calib:
        names = list(dict.fromkeys(r["setting"] for r in calib))
        labels = sorted({r["action"] for r in calib}, key=_action_order)
        table = [[name, fmt(next(r["engine"]["calibration"].get("tokens") for r in calib if r["setting"] == name), 0),
                  *(fmt(_get(calib, name, a, "ppl_ratio"), 2) for a in labels)] for name in names]
        out += ["### Calibration size (defaults), WikiText-2 PPL ratio", "",
                *md_table(["calibration", "tokens", *labels], table), ""]
    diag = [r for r in rows if r["stage"] == "heads_calibration"]
    if diag:
        table = [[r["setting"], fmt(r["engine"]["calibration"].get("tokens"), 0), fmt(r["ppl_ratio"], 2),
                  "".join(map(str, r["kept_per_layer"]))] for r in diag]
        out += ["### Heads 0.2 by calibration size x allocation x recovery, WikiText-2 PPL ratio", "",
                *md_table(["allocation/recovery x texts", "tokens", "attention_heads:0.2",
                           "KV groups kept per layer (layer 0 first)"], table), ""]
    speed = [r for r in rows if r["stage"] == "speed"]
    held_out = [r for r in rows if r["stage"] == "heldout"]
    if held_out:
        out += held_out_table(held_out)
    if speed:
        table = [[r["setting"], r["action"], r["kept"], fmt(r["speedup"], 2), fmt(r["ideal_speedup"], 2),
                  fmt(r["achieved_over_ideal"], 2)] for r in speed]
        out += ["### Decode speed of the default plans", "",
                *md_table(["setting [model]", "action", "kept per layer", "speedup (x)", "ideal (x)",
                           "achieved / ideal"], table), ""]
    return "\n".join(out)


def _get(rows: list[dict], setting: str, action: str, key: str):
    return next((r.get(key) for r in rows if r["setting"] == setting and r["action"] == action), None)


def _geomean(values: list) -> float | None:
    values = [v for v in values if v]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def _action_order(label: str) -> tuple:
    target, _, r = label.partition(":")
    return (TARGETS.index(target) if target in TARGETS else -1, float(r or 0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("select", "table", "calibration", "heads-calibration", "speed", "heal", "all"),
                   default="table")
    p.add_argument("--healed", default=None, help="heal stage: a folder written by --mode heal")
    p.add_argument("--heal-intensities", default=",".join(map(str, INTENSITIES)),
                   help="heal stage: intensities of the healed actions scored")
    p.add_argument("--held-out", default=None, metavar="FILE",
                   help="heal stage: also each action's KL to the original dense model on this heal-validation.pt "
                        "(a --mode heal run's held-out continuations; use one file for every run compared)")
    p.add_argument("--out", default=str(ROOT / "bench" / "recovery.json"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--wikitext-path", default=None)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tasks", default="", help="lm-eval tasks, e.g. lambada_openai,arc_easy")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--task-intensities", default="0.2")
    p.add_argument("--speed-pairs", type=int, default=5)
    p.add_argument("--speed-new-tokens", type=int, default=32)
    p.add_argument("--speed-models", default="smollm2-135m,llama-3.2-1b-shape",
                   help="speed stage: models to time (--model's name stands for the loaded model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true", help="print the tables from --out and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    import torch
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    run(args)
    print(markdown(json.loads(Path(args.out).read_text())))


if __name__ == "__main__":
    main()
