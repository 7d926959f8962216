"""Importance criteria the engine takes: scores that order every target's units (higher = keep longer).

As in Torch-Pruning, importance is an object passed into the pruner, not a subclass of it. Two levels:
a per-unit *importance* (``Magnitude``, ``Activation``, ``Fluctuation``, ``BlockInfluence``, ``Taylor``)
scores one target's units from a target's own description (its weights, its ``column_projection``, its cuts);
a *criterion* (``Criterion``, registered by name in ``IMPORTANCE``) is the ordered importances that score every
registered target, the first that supports a target scoring it. ``PruningEngine(model, importance="taylor")``
looks the name up; any ``Criterion`` can be passed instead. The engine tokenises the calibration prompts and
caches the scores on disk by name.

Importances:
- ``Magnitude`` (data-free): each target's ``magnitude`` (FFN channel j = ||gate_j||*||up_j||*||down_:,j||;
  KV group g = ||v_g||_F * ||o_:,g||_F; layers: the norm bound of how far each block can move the residual
  stream, a weak proxy).
- ``Activation`` (Wanda-style): unit score = sum over its ``column_projection`` columns of |W_ij| * ||X_j||, X
  its input on calibration text.
- ``Fluctuation`` (FLAP): unit score = Var(X_j) * ||W_:,j||^2 (what is left after bias compensation removes
  the unit's mean contribution).
- ``BlockInfluence`` (ShortGPT): layers by BI = 1 - mean cos(layer input, layer output) on calibration text.
- ``Taylor`` (LLM-Pruner): first-order |W * dL/dW| summed per unit (``pruners.scoring.taylor``).
Criteria: magnitude; activation and fluctuation (their unit importance, layers by Block Influence);
block_influence (layers by BI, units by magnitude); taylor.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruners.scoring.calibration_pass import calibration_pass
from pruners.recovery.compensation import TailSums
from pruners.scoring.criteria import (Activation, Activations, BlockInfluence, Fluctuation, Magnitude, Statistics,
                              score_targets)
from pruners.model_info import decoder_layers
from pruners.scoring.score_cache import ImportanceScores
from pruners.targets import all_targets
from pruners.scoring.taylor import compute_taylor_scores

log = logging.getLogger(__name__)


class ActivationCollector:
    """Sums of x^2 (every token) of every target's column projection input (o_proj, down_proj) and each layer's
    cos(input, output) (Block Influence): a ``calibration_pass`` collector. The sums after the sink token(s),
    which fluctuation importance reads, are ``compensation.TailSums``."""

    def __init__(self, model: nn.Module) -> None:
        layers = decoder_layers(model)

        def zeros(width: int) -> torch.Tensor:
            return torch.zeros(width, dtype=torch.float64)
        self.paths = [t.column_projection for t in all_targets() if t.column_projection]
        self.acts = Activations(sq={p: [zeros(ly.get_submodule(p).in_features) for ly in layers] for p in self.paths},
                                 cos_sum=zeros(len(layers)), tokens=0)
        self._inputs: dict[int, torch.Tensor] = {}

    @staticmethod
    def _add_sq(store: list[torch.Tensor], i: int, x: torch.Tensor) -> None:
        x = x.detach().double()
        store[i] += x.pow(2).reshape(-1, x.shape[-1]).sum(0).cpu()

    def attach(self, layers: Sequence[nn.Module]) -> list:
        acts, handles = self.acts, []
        for i, layer in enumerate(layers):
            def pre(_m, args, kwargs, i=i):
                self._inputs[i] = args[0] if args else kwargs["hidden_states"]

            def post(_m, _args, _kwargs, output, i=i):
                out = output[0] if isinstance(output, tuple) else output
                cos = F.cosine_similarity(self._inputs.pop(i).float(), out.float(), dim=-1)
                acts.cos_sum[i] += cos.double().sum().cpu()

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
            for path in self.paths:
                handles.append(layer.get_submodule(path).register_forward_pre_hook(
                    lambda _m, a, i=i, path=path: self._add_sq(acts.sq[path], i, a[0])))
        return handles

    def start(self) -> None:
        pass

    def finish(self, ids: torch.Tensor) -> None:
        self.acts.tokens += ids.numel()


def collect_activations(model: nn.Module, calibration_ids: Sequence[torch.Tensor]) -> tuple[Activations, TailSums]:
    """One pass over the calibration prompts with hooks; nothing but sums is kept."""
    collector, tails = ActivationCollector(model), TailSums()
    calibration_pass(model, calibration_ids, [collector, tails], desc="importance statistics")
    return collector.acts, tails


def tokenize_calibration(texts: Sequence[str], tokenizer, max_tokens: int) -> list[torch.Tensor]:
    ids = [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_tokens).input_ids for t in texts]
    ids = [x for x in ids if x.numel() > 1]
    if not ids:
        raise ValueError("calibration prompts tokenised to nothing")
    return ids


def magnitude_importance(model: nn.Module, _calibration_ids: Sequence[torch.Tensor] | None = None) -> ImportanceScores:
    """Data-free: every unit and layer by its weight norms."""
    return score_targets("magnitude", (Magnitude(),), model, Statistics())


def by_activations(name: str, *importances) -> Callable[[nn.Module, Activations, TailSums], ImportanceScores]:
    """A criterion's scores from one calibration pass's activation and tail sums."""
    def score(model: nn.Module, acts: Activations, tails: TailSums) -> ImportanceScores:
        return score_targets(name, importances, model, Statistics(acts=acts, tails=tails))
    return score


@dataclass(frozen=True)
class Criterion:
    """An importance criterion as the engine takes it; ``name`` keys the score cache.

    A criterion that reads only the calibration activations (``from_activations``: the ``ActivationCollector``
    sums and the ``compensation.TailSums``) can share its calibration pass with the compensation moments
    (the engine then runs one pass for both, and the tail sums once)."""
    name: str
    needs_calibration: bool    # scores read calibration prompts (the engine tokenises them)
    score: Callable[[nn.Module, Sequence[torch.Tensor] | None], ImportanceScores] | None = None
    from_activations: Callable[[nn.Module, Activations, TailSums], ImportanceScores] | None = None

    def __call__(self, model: nn.Module, calibration_ids: Sequence[torch.Tensor] | None) -> ImportanceScores:
        if self.from_activations is None:
            return self.score(model, calibration_ids)
        if not calibration_ids:
            raise ValueError(f"importance '{self.name}' needs calibration prompts")
        acts, tails = collect_activations(model, calibration_ids)
        log.info("importance %s from %d calibration tokens", self.name, acts.tokens)
        return self.from_activations(model, acts, tails)


IMPORTANCE: dict[str, Criterion] = {c.name: c for c in (
    Criterion("magnitude", False, magnitude_importance),
    Criterion("activation", True, from_activations=by_activations("activation", Activation(), BlockInfluence())),
    Criterion("fluctuation", True, from_activations=by_activations("fluctuation", Fluctuation(), BlockInfluence())),
    Criterion("block_influence", True, from_activations=by_activations("block_influence", BlockInfluence(),
                                                                         Magnitude())),
    Criterion("taylor", True, compute_taylor_scores),
)}


def get_importance(importance: str | Criterion) -> Criterion:
    """A registered criterion by name, or the criterion object given."""
    if isinstance(importance, Criterion):
        return importance
    try:
        return IMPORTANCE[importance]
    except KeyError:
        raise ValueError(f"unknown importance criterion '{importance}': choose from {', '.join(IMPORTANCE)}") from None
