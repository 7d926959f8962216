"""Static baselines sweep: every method at every parameter budget, on the same protocol as eval.

For each structured method (``structured.STRUCTURED_METHODS``) and budget (share of
non-embedding parameters removed, matched by ``budget.match_budget``) a row gets the parameters
left, the measured decode speedup, the ideal (bytes-read) speedup, WikiText-2 perplexity and,
when ``eval.tasks`` is set, lm-eval accuracies. Unstructured / N:M references
(``unstructured.py``) add quality-only rows, and policy checkpoints add one routed point each.
Quantization is a baseline and an axis (issue 25): for each weight dtype of ``quantized`` (int8 by
default, ``runtime.dtype``), a ``quantized`` row for the dense model at that dtype and one for every
structured point at that dtype (``method+int8``), timed against the same fp32 dense model, so the
Pareto plot shows what pruning adds on top of quantizing. The rows are metrics.json's
``"baselines"`` list (reports/README.md), which ``reporting`` turns into the Pareto plot::

    rows = run_baselines(loaded, BaselineConfig(policies=("checkpoints/policy.pt",)), out_dir=run_dir)

Speedup: decode speed is memory-bound and the machine may be shared, so every point is timed
against the dense model by the protocol of ``runtime.timing`` (interleaved dense/pruned pairs,
greedy, EOS ignored, each side warmed up once, ratio of the median decode steps) under the
execution governor's setting, which each row records (``runtime``). Perplexity and
accuracies come from ``evaluation.evaluate_route``, the code path of ``--mode eval``.
"""
from __future__ import annotations

from common import hub  # noqa: F401  (HF offline flags before transformers/datasets/lm_eval load)

import contextlib
import dataclasses
import logging
import statistics
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pruners.methods.param_budget import count_parameters, removed_share
from evaluation.routes import ModelSpec, Route, RouterFactory, StaticRoute, build_route
from common.calibration import calibration_set
from common.config import WEIGHT_DTYPE_BYTES, WEIGHT_DTYPES, BaselineConfig, RunConfig
from common.markdown import fmt, md_table
from evaluation.suite import evaluate_route
from runtime.dtype import weight_dtype_scope
from runtime.generation import Decoder, eager_decoder, generate
from environments.session import build_engine as build_run_engine, with_trained_engine
from runtime.governor import ExecutionGovernor
from runtime.timing import RunTiming, TimingSession
from evaluation.lm_eval_tasks import prepare_tasks
from pruners import NONE, PruningAction, PruningEngine
from pruners.cost import DecodeShape, decode_cost, ideal_speedup
from pruners.model_info import ModelDims
from pruners.scoring.importance import tokenize_calibration
from pruners.methods.static_methods import build_engine, get_method, resolve
from pruners.methods.unstructured import METHODS as UNSTRUCTURED_METHODS, Sparsity, sparsified
from evaluation.wikitext import CorpusText, load_wikitext2_test

log = logging.getLogger(__name__)

NO_SPEEDUP = "no speedup on dense kernels (zeros are still multiplied; speedup not timed)"
QUANTIZED = tuple(d for d in WEIGHT_DTYPES if d != "float32")
IDEAL_NOTE = "speedup over fp32 dense; ideal: fp32 dense bytes / bytes with the weights in the dtype (KV cache fp32)"


def validate_config(cfg: BaselineConfig) -> None:
    """Refuse a sweep that cannot run, before any model time is spent."""
    for name in cfg.methods:
        get_method(name)
    for spec in cfg.unstructured:
        parse_unstructured(spec)
    for dtype in cfg.quantized:
        if dtype not in QUANTIZED:
            raise ValueError(f"--quantized-baselines {dtype}: choose from {', '.join(QUANTIZED)}")
    for budget in cfg.budgets:
        if not 0.0 < budget < 1.0:
            raise ValueError(f"budget {budget} must be a share of non-embedding parameters in (0, 1)")
    if not cfg.eval.wikitext:
        raise ValueError("the baselines sweep needs WikiText-2 perplexity (eval.wikitext=True)")


def parse_unstructured(spec: str) -> tuple[str, Sparsity]:
    """'wanda:2:4' -> ('wanda', Sparsity(n=2, m=4)); 'magnitude:0.5' -> ('magnitude', Sparsity(0.5))."""
    method, _, sparsity = spec.partition(":")
    if method not in UNSTRUCTURED_METHODS or not sparsity:
        raise ValueError(f"unstructured baseline '{spec}': use METHOD:SPARSITY with METHOD in "
                         f"{', '.join(UNSTRUCTURED_METHODS)}, e.g. wanda:0.5 or sparsegpt:2:4")
    return method, Sparsity.parse(sparsity)


@dataclass
class BaselineRow:
    """One point of the comparison (reports/README.md, ``baselines[]``)."""
    method: str
    kind: str                     # dense | structured | unstructured | policy
    budget: float | None          # requested share of non-embedding parameters removed
    removed: float | None         # share really removed (rounding to whole units; zeros for unstructured)
    params: int | None            # parameters left (unstructured: non-zero ones)
    speedup: float | None         # measured decode speedup, x vs dense
    ideal_speedup: float | None   # bytes read per decoded token, dense / pruned
    ppl: float | None             # WikiText-2 perplexity
    action: str | None = None     # engine action (structured) or sparsity (unstructured)
    importance: str | None = None
    note: str | None = None
    accuracies: dict[str, float | None] = field(default_factory=dict)   # task -> acc
    actions: dict[str, int] | None = None   # policy: decisions per action while scoring
    runtime: str | None = None    # the runtime the speedup was timed under (runtime.governor)

    def to_dict(self) -> dict:
        """Flat row: accuracies become numeric columns, plus their mean when every task has one."""
        row = dataclasses.asdict(self)
        accuracies = row.pop("accuracies")
        row.update(accuracies)
        if accuracies and all(v is not None for v in accuracies.values()):
            row["mean_acc"] = statistics.fmean(accuracies.values())
        return {k: v for k, v in row.items() if v is not None}


# ------------------------------------------------------------------ inputs

def speed_prompts(corpus: CorpusText, tokenizer, count: int, tokens: int) -> list[tuple[str, torch.Tensor]]:
    """``count`` evenly spaced WikiText slices of exactly ``tokens`` tokens, as (text, ids)."""
    out = []
    for i in range(count):
        start = i * len(corpus.text) // count
        ids = tokenizer(corpus.text[start:start + 16 * tokens], add_special_tokens=False)["input_ids"][:tokens]
        if len(ids) < tokens:
            raise ValueError(f"WikiText slice {i} has fewer than {tokens} tokens: lower speed_prompt_tokens")
        out.append((tokenizer.decode(ids), torch.tensor([ids])))
    return out


# ------------------------------------------------------------------ measurements

def decode_speedup(model: torch.nn.Module, prompts: Sequence[tuple[str, torch.Tensor]], new_tokens: int,
                   repeats: int, pruned: Callable[[str], AbstractContextManager], engine=None,
                   session: TimingSession | None = None, decoder: Decoder = eager_decoder) -> float:
    """Median dense / median pruned decode step over ``repeats`` rounds of the prompts, one
    interleaved pair per prompt (runtime.timing); ``pruned(text)`` scopes one run.

    ``engine`` is handed to ``generate`` so a kv_cache action chosen inside ``pruned`` applies.
    """
    def dense(prompt: tuple[str, torch.Tensor]) -> RunTiming:
        return RunTiming.of(generate(model, prompt[1], new_tokens, engine=engine, ignore_eos=True, decoder=decoder))

    def sparse(prompt: tuple[str, torch.Tensor]) -> RunTiming:
        with pruned(prompt[0]):
            return dense(prompt)

    rounds = [prompt for _ in range(repeats) for prompt in prompts]
    return (session or TimingSession()).compare(dense, sparse, rounds).decode_speedup


class _Sweep:
    """Shared inputs of one sweep (model, corpus, task plan, prompts) and how each kind of row is scored."""

    def __init__(self, loaded, cfg: BaselineConfig) -> None:
        self.loaded, self.cfg = loaded, cfg
        self.eval = dataclasses.replace(cfg.eval, speed_probe=False)   # speed is timed interleaved here
        self.corpus = load_wikitext2_test(self.eval.wikitext_path)
        self.tasks = prepare_tasks(self.eval.tasks, self.eval.task_data) if self.eval.tasks else None
        self.task_manager = self.tasks.task_manager() if self.tasks else None
        self.prompts = speed_prompts(self.corpus, loaded.tokenizer, cfg.speed_prompts, cfg.speed_prompt_tokens)
        self.calibration = calibration_set(cfg.calibration).texts
        self.calibration_ids = tokenize_calibration(self.calibration, loaded.tokenizer, cfg.calibration.max_tokens)
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        self.dense_params = count_parameters(loaded.model)
        # Read the policies' checkpoints now, so a wrong path fails before the long sweep, not after it.
        self.policy_configs = {c: _policy_config(c, cfg.policy_importance) for c in cfg.policies}
        self.governor = ExecutionGovernor(device=next(loaded.model.parameters()).device)

    def score(self, route: Route) -> dict:
        return evaluate_route(self.loaded, route, self.corpus, self.tasks, self.task_manager, self.eval)

    def speedup(self, pruned: Callable[[str], AbstractContextManager], engine) -> tuple[float, str]:
        """(decode speedup, the runtime label it was timed under)."""
        decoder = self.governor.decoder(self.loaded.model, engine)     # first: the live check times this step
        session = TimingSession(self.governor.govern(explore=False))
        return decode_speedup(self.loaded.model, self.prompts, self.cfg.speed_new_tokens, self.cfg.speed_repeats,
                              pruned, engine, session, decoder), session.runtime

    def ideal(self, engine: PruningEngine, action: PruningAction) -> float:
        return engine.ideal_speedup(action, self.cfg.speed_prompt_tokens, self.cfg.speed_new_tokens / 2)

    def quantized_ideal(self, dtype: str, engine: PruningEngine | None = None, action: PruningAction = NONE) -> float:
        """fp32 dense bytes / the bytes of ``action`` (dense without an engine) with its weights in ``dtype``."""
        prompt, generated = self.cfg.speed_prompt_tokens, self.cfg.speed_new_tokens / 2
        if engine is None:
            dims = ModelDims.from_model(self.loaded.model)
            element = next(self.loaded.model.parameters()).element_size()
            dense = pruned = decode_cost(dims, DecodeShape.dense(dims, prompt), generated, element)
        else:
            dense, pruned = engine.decode_cost(NONE, prompt, generated), engine.decode_cost(action, prompt, generated)
        return ideal_speedup(dense, pruned, WEIGHT_DTYPE_BYTES[dtype])

    def dense(self) -> BaselineRow:
        entry = self.score(Route(ModelSpec("dense")))
        return BaselineRow("dense", "dense", 0.0, 0.0, self.dense_params.total, 1.0, 1.0, _ppl(entry),
                           action=NONE.label, accuracies=_accuracies(entry))

    def structured(self, engine: PruningEngine, method_name: str, budget: float) -> BaselineRow:
        method = get_method(method_name)
        match = resolve(engine, method, budget)
        entry = self.score(StaticRoute(ModelSpec("static", action=match.action), engine))
        speedup, runtime = self.speedup(lambda _text: engine.pruned(match.action), engine)
        return BaselineRow(method.name, "structured", budget, match.removed, match.params, speedup,
                           self.ideal(engine, match.action), _ppl(entry), action=match.action.label,
                           importance=method.importance, accuracies=_accuracies(entry), runtime=runtime)

    def quantized(self, dtype: str, engine: PruningEngine | None = None, method_name: str | None = None,
                  budget: float | None = None) -> BaselineRow:
        """The dense model (no ``engine``) or a structured point, computed in ``dtype``; speedup over fp32 dense."""
        model = self.loaded.model
        if engine is None:
            with weight_dtype_scope(model, dtype):
                entry = self.score(Route(ModelSpec("dense")))
            speedup, runtime = self.speedup(lambda _text: weight_dtype_scope(model, dtype), None)
            return BaselineRow(dtype, "quantized", 0.0, 0.0, self.dense_params.total, speedup,
                               self.quantized_ideal(dtype),
                               _ppl(entry), action=NONE.label, note=IDEAL_NOTE, accuracies=_accuracies(entry),
                               runtime=runtime)
        method = get_method(method_name)
        match = resolve(engine, method, budget)
        with weight_dtype_scope(model, dtype):
            entry = self.score(StaticRoute(ModelSpec("static", action=match.action), engine))

        @contextlib.contextmanager
        def pruned(_text: str):
            with weight_dtype_scope(model, dtype), engine.pruned(match.action):
                yield
        speedup, runtime = self.speedup(pruned, engine)
        return BaselineRow(f"{method.name}+{dtype}", "quantized", budget, match.removed, match.params, speedup,
                           self.quantized_ideal(dtype, engine, match.action), _ppl(entry),
                           action=match.action.label, importance=method.importance, note=IDEAL_NOTE,
                           accuracies=_accuracies(entry), runtime=runtime)

    def unstructured(self, spec: str) -> BaselineRow:
        method, sparsity = parse_unstructured(spec)
        with sparsified(self.loaded.model, method, sparsity, self.calibration_ids,
                        progress=self.eval.progress) as report:
            entry = self.score(Route(ModelSpec("dense")))
        name = f"{method}-{sparsity.label}" if sparsity.m else f"{method}-unstructured"
        return BaselineRow(name, "unstructured", sparsity.fraction,
                           report.zeros / self.dense_params.non_embedding, self.dense_params.total - report.zeros,
                           1.0, 1.0, _ppl(entry), action=sparsity.label, importance=method, note=NO_SPEEDUP,
                           accuracies=_accuracies(entry))

    def policy(self, checkpoint: str, router_factory: RouterFactory | None) -> BaselineRow:
        policy_cfg = self.policy_configs[checkpoint]      # the engine (menu) the policy learned on
        importance = policy_cfg.importance
        engine = build_run_engine(policy_cfg, self.loaded, cache_dir=self.cache_dir)
        route = build_route(ModelSpec("policy", checkpoint=checkpoint), self.loaded, engine, router_factory)
        entry = self.score(route)
        speedup, runtime = self.speedup(route.request, engine)
        decisions = entry["actions"]
        shares = {label: removed_share(engine, PruningAction.parse(label)) for label in decisions}
        n = sum(decisions.values())
        removed = sum(shares[label][0] * count for label, count in decisions.items()) / n
        params = round(sum(shares[label][1] * count for label, count in decisions.items()) / n)
        return BaselineRow(route.label, "policy", None, removed, params, speedup, None, _ppl(entry),
                           importance=importance, note="mean over the scored requests' decisions",
                           accuracies=_accuracies(entry), actions=decisions, runtime=runtime)


def _ppl(entry: dict) -> float:
    return entry["wikitext"]["ppl"]


def _accuracies(entry: dict) -> dict[str, float | None]:
    return {task: score.get("acc") for task, score in sorted(entry["tasks"].items())}


def _policy_config(checkpoint: str, importance: str | None) -> RunConfig:
    """A structural run config with the engine settings the checkpoint's policy was trained with."""
    if importance is not None:    # set explicitly: the checkpoint's engine settings are not read
        return RunConfig(structural=True, importance=importance)
    from controller import checkpointing
    trained = checkpointing.load_checkpoint(Path(checkpoint))["config"]
    return with_trained_engine(RunConfig(structural=True), trained, {"structural"})


# ------------------------------------------------------------------ the sweep

def run_baselines(loaded, config: BaselineConfig, out_dir: Path | None = None,
                  router_factory: RouterFactory | None = None,
                  on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Score dense, every structured method x budget, the unstructured references and the policies.

    Engines reorder ``loaded.model`` in place (dense outputs unchanged) and every row restores
    the dense weights, so the model is dense afterwards. ``on_row(rows)`` is called after each
    row (for partial metrics.json writes); ``out_dir`` gets ``baselines.md``.
    """
    validate_config(config)
    sweep = _Sweep(loaded, config)
    points = len(config.methods) * len(config.budgets)
    total = (1 + points) * (1 + len(config.quantized)) + len(config.unstructured) + len(config.policies)
    rows: list[dict] = []
    bar = tqdm(total=total, desc="baselines", unit="point", disable=not config.eval.progress)

    def add(row: BaselineRow) -> None:
        rows.append(row.to_dict())
        log.info("%s @ %s: params %s, speedup %.2fx, ppl %.3f", row.method, row.budget, row.params,
                 row.speedup or float("nan"), row.ppl)
        bar.update()
        if on_row:
            on_row(rows)

    with bar:
        add(sweep.dense())
        for dtype in config.quantized:
            bar.set_postfix_str(f"dense {dtype}")
            add(sweep.quantized(dtype))
        for name in config.methods:
            bar.set_postfix_str(f"{name}: importance")
            engine = build_engine(loaded, get_method(name), sweep.calibration, config.calibration.max_tokens,
                                  sweep.cache_dir)
            for budget in config.budgets:
                bar.set_postfix_str(f"{name} @ {budget:g}")
                add(sweep.structured(engine, name, budget))
                for dtype in config.quantized:    # shadows follow this engine's reorder (runtime.dtype)
                    bar.set_postfix_str(f"{name} @ {budget:g} {dtype}")
                    add(sweep.quantized(dtype, engine, name, budget))
        for spec in config.unstructured:
            bar.set_postfix_str(spec)
            add(sweep.unstructured(spec))
        for checkpoint in config.policies:
            bar.set_postfix_str(f"policy {checkpoint}")
            add(sweep.policy(checkpoint, router_factory))
    if out_dir is not None:
        path = Path(out_dir) / "baselines.md"
        path.write_text(format_table(rows) + "\n", encoding="utf-8")
        log.info("baselines table written to %s", path)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table: one row per method and budget, accuracy columns for every task scored."""
    fixed = set(BaselineRow.__dataclass_fields__) | {"mean_acc"}
    tasks = sorted({k for r in rows for k in r if k not in fixed})
    header = ["method", "kind", "budget", "removed", "params (M)", "speedup (×)", "ideal (×)", "WikiText-2 PPL",
              *tasks, *(["mean acc"] if tasks else []), "note"]
    table = []
    for r in rows:
        params = r.get("params")
        table.append([r["method"], r["kind"], fmt(r.get("budget"), 2), fmt(r.get("removed"), 3),
                      fmt(params / 1e6 if params is not None else None, 2), fmt(r.get("speedup"), 2),
                      fmt(r.get("ideal_speedup"), 2), fmt(r.get("ppl"), 2),
                      *(fmt(r.get(t), 4) for t in tasks), *([fmt(r.get("mean_acc"), 4)] if tasks else []),
                      r.get("note", "")])
    return "\n".join(md_table(header, table))
