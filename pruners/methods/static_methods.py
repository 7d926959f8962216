"""Static structured baselines, each an importance criterion plus the engine target it prunes.

Every baseline runs through the same PruningEngine as the policy (reorder once, prune a
prefix), so it gets real slicing speedups and is scored by the same evaluation suite:

| method      | criterion (pruners.scoring.importance.IMPORTANCE)                 | target             |
|-------------|-----------------------------------------------------------|--------------------|
| magnitude   | weight norms of each FFN channel                          | ffn_neurons        |
| wanda-sp    | Wanda-style structured: sum |W_ij| * ||X_j|| per channel  | ffn_neurons        |
| taylor      | LLM-Pruner first-order |W * dL/dW| summed per channel     | ffn_neurons        |
| shortgpt    | Block Influence 1 - cos(layer in, layer out)              | transformer_layers |

Width methods prune FFN channels (uniform across layers) because the engine applies one target
at a time and FFN channels are the only width target that reaches every budget: a KV group is
a third of SmolLM2's attention, and attention heads are only ~25% of its decoder, so heads alone
stop at ~17% of the non-embedding parameters. ``budget.match_budget`` turns a budget into the
intensity of the method's target.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pruners.methods.param_budget import BudgetMatch, match_budget
from pruners import PruningEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StructuredMethod:
    name: str
    importance: str   # a criterion name of pruners.scoring.importance.IMPORTANCE
    target: str


STRUCTURED_METHODS = {m.name: m for m in (
    StructuredMethod("magnitude", "magnitude", "ffn_neurons"),
    StructuredMethod("wanda-sp", "activation", "ffn_neurons"),
    StructuredMethod("taylor", "taylor", "ffn_neurons"),
    StructuredMethod("shortgpt", "block_influence", "transformer_layers"),
)}


def get_method(name: str) -> StructuredMethod:
    try:
        return STRUCTURED_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown structured baseline '{name}': choose from {', '.join(STRUCTURED_METHODS)}") from None


def parse_baseline(spec: str) -> tuple[StructuredMethod, float]:
    """'taylor@0.3' -> (the taylor method, budget 0.3), as ``--baseline`` takes it."""
    name, sep, budget = spec.partition("@")
    try:
        value = float(budget)
    except ValueError:
        value = None
    if not sep or value is None or not 0.0 < value < 1.0:
        raise ValueError(f"baseline '{spec}' must look like METHOD@BUDGET with BUDGET in (0, 1), e.g. taylor@0.3")
    return get_method(name), value


def build_engine(loaded, method: StructuredMethod, calibration: Sequence[str], max_tokens: int = 256,
                 cache_dir: Path | None = None) -> PruningEngine:
    """A structural engine ordered by the method's criterion (reorders ``loaded.model`` in place)."""
    return PruningEngine(loaded.model, mode="structural", importance=method.importance, calibration=calibration,
                         tokenizer=loaded.tokenizer, cache_dir=cache_dir, calibration_max_tokens=max_tokens)


def resolve(engine: PruningEngine, method: StructuredMethod, budget: float) -> BudgetMatch:
    """The engine action that removes ``budget`` of the non-embedding parameters for this method."""
    match = match_budget(engine, method.target, budget)
    log.info("%s @ %.2f -> %s (removes %.3f)", method.name, budget, match.action.label, match.removed)
    return match


def export_baseline(loaded, spec: str, out_dir: Path, calibration: Sequence[str], max_tokens: int = 256,
                    cache_dir: Path | None = None, gguf: bool = False, vocab_gguf: Path | None = None) -> Path:
    """Export the model a baseline ``METHOD@BUDGET`` prunes (see ``export.export_pruned``)."""
    from pruners.export.checkpoint import export_pruned

    method, budget = parse_baseline(spec)
    engine = build_engine(loaded, method, calibration, max_tokens, cache_dir)
    match = resolve(engine, method, budget)
    return export_pruned(loaded, engine, match.action, out_dir, method=method.name, budget=budget, gguf=gguf,
                         vocab_gguf=vocab_gguf)
