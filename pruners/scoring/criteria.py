"""Per-unit importances: each scores one target's units, from what the target says about itself.

A target gives its ``magnitude`` and ``taylor`` formulas, its ``column_projection`` (whose input columns are
its units) and ``units`` per layer, and whether its units are whole layers (``orders_layers``); the
importances below need nothing else, so a new target is scored by every criterion without touching them.
``pruners.scoring.importance`` combines them into the registered criteria.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pruners.recovery.compensation import TailSums
from pruners.model_info import ModelDims, decoder_layers
from pruners.scoring.score_cache import ImportanceScores
from pruners.targets import all_targets


def _group_sum(values: torch.Tensor, n_groups: int) -> torch.Tensor:
    return values.reshape(n_groups, -1).sum(dim=1)


@dataclass
class Activations:
    sq: dict[str, list[torch.Tensor]]   # column projection -> per layer: sum over tokens of x^2 of its input
    cos_sum: torch.Tensor               # per layer: sum over tokens of cos(input, output)
    tokens: int


@dataclass
class Statistics:
    """What the importances read: calibration activation sums, tail sums (after the sink token), first-order
    saliences (per layer: projection path -> |W * dL/dW|); each None where nobody collected it."""
    acts: Activations | None = None
    tails: TailSums | None = None
    salience: list[dict[str, torch.Tensor]] | None = None


class Magnitude:
    name = "magnitude"

    def supports(self, target) -> bool:
        return True

    def __call__(self, target, model: nn.Module, dims: ModelDims, stats: Statistics) -> torch.Tensor:
        return torch.stack([target.magnitude(layer, dims) for layer in decoder_layers(model)]).cpu()


class ColumnImportance:
    """Scores of a target whose units are input columns of its ``column_projection``: one value per column,
    summed per unit."""
    name = ""

    def supports(self, target) -> bool:
        return target.column_projection is not None

    def column_scores(self, index: int, path: str, weight: torch.Tensor, stats: Statistics) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, target, model: nn.Module, dims: ModelDims, stats: Statistics) -> torch.Tensor:
        path = target.column_projection
        return torch.stack([_group_sum(self.column_scores(i, path, layer.get_submodule(path).weight.detach().float(),
                                                          stats), target.units(dims))
                            for i, layer in enumerate(decoder_layers(model))])


class Activation(ColumnImportance):
    """Structured Wanda: sum_i |W_ij| * ||X_j|| over each unit's input columns."""
    name = "activation"

    def column_scores(self, index: int, path: str, weight: torch.Tensor, stats: Statistics) -> torch.Tensor:
        return weight.abs().sum(0).cpu() * stats.acts.sq[path][index].sqrt().float()


class Fluctuation(ColumnImportance):
    """FLAP: Var(X_j) * ||W_:,j||^2 per input column.

    What a unit's removal leaves once its mean is compensated (``pruners.recovery.compensation``) is its
    fluctuation times its weights, so this is the criterion that matches ``--recovery compensate``.
    """
    name = "fluctuation"

    def column_scores(self, index: int, path: str, weight: torch.Tensor, stats: Statistics) -> torch.Tensor:
        return stats.tails.variance(f"{index}.{path}") * weight.pow(2).sum(0).cpu()


class BlockInfluence:
    name = "block_influence"

    def supports(self, target) -> bool:
        return target.orders_layers

    def __call__(self, target, model: nn.Module, dims: ModelDims, stats: Statistics) -> torch.Tensor:
        return (1.0 - stats.acts.cos_sum / stats.acts.tokens).float()


class Taylor:
    name = "taylor"

    def supports(self, target) -> bool:
        return True

    def __call__(self, target, model: nn.Module, dims: ModelDims, stats: Statistics) -> torch.Tensor:
        return torch.stack([target.taylor(s, dims) for s in stats.salience]).float()


@torch.no_grad()
def score_targets(criterion: str, importances: Sequence, model: nn.Module, stats: Statistics) -> ImportanceScores:
    """Every scored target's units by the first of ``importances`` that supports the target."""
    dims = ModelDims.from_model(model)
    units, layer_source = {}, criterion
    for target in all_targets():
        if target.score_key is None:
            continue
        importance = next(imp for imp in importances if imp.supports(target))
        units[target.score_key] = importance(target, model, dims, stats)
        if target.orders_layers:
            layer_source = importance.name
    return ImportanceScores(criterion, units, layer_source)
