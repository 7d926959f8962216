"""What attention heads and FFN channels share: units inside every layer, cut as prefixes of projections.

A width unit is a block of rows of some projections and the same block of input columns of one projection
(``column_projection``: o_proj / down_proj), so slicing, masks, FLAP bias compensation, the generic
activation criteria and the differentiable student view are written once here.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from pruners.actions import PruningAction
from pruners.cost import DecodeShape
from pruners.model_info import ModelDims, decoder_layers
from pruners.plan import PruningPlan
from pruners.units.slicing import COLS, ROWS, Cut
from pruners.targets.base import Target

if TYPE_CHECKING:
    from pruners.engine import PruningEngine


class WidthTarget(Target):
    """Units inside every decoder layer; subclasses say which projections a unit spans and how plans round."""
    removes_weights = True

    def units(self, dims: ModelDims) -> int:
        """Units per layer."""
        raise NotImplementedError

    def magnitude(self, layer: nn.Module, dims: ModelDims) -> torch.Tensor:
        """Data-free score of each unit of one layer from its weights."""
        raise NotImplementedError

    def cuts(self, plan: PruningPlan, dims: ModelDims) -> list[tuple[int, Cut]]:
        full = self.units(dims)
        return [(i, c) for i, kept in enumerate(plan.kept) if kept < full for c in self.layer_cuts(kept, dims)]

    def extra_params(self, engine: "PruningEngine", plan: PruningPlan) -> int:
        return sum(engine.dims.hidden for _, c in self.cuts(plan, engine.dims) if c.dim == COLS)

    def effective_intensity(self, plan: PruningPlan, dims: ModelDims, prompt_tokens: int | None) -> float:
        return 1 - sum(plan.kept) / (dims.num_layers * self.units(dims))

    def decode_shape(self, shape: DecodeShape, plan: PruningPlan, structural: bool) -> DecodeShape:
        return dataclasses.replace(shape, **{self.plan_key.removesuffix("_kept"): plan.kept}) if structural and plan.kept else shape

    def taylor(self, salience: dict[str, torch.Tensor], dims: ModelDims) -> torch.Tensor:
        """First-order salience summed over each unit's rows and columns of every projection it spans."""
        n = self.units(dims)
        return sum(salience[c.path].sum(1 - c.dim).reshape(n, -1).sum(dim=1) for c in self.layer_cuts(n, dims))

    # ---------------------------------------------------------------- apply and recovery
    def prepare(self, engine: "PruningEngine", actions: Sequence[PruningAction], progress: bool) -> None:
        for action in actions:
            engine.bias_swaps(action)

    def apply(self, engine: "PruningEngine", action: PruningAction, plan: PruningPlan) -> None:
        if engine.mode == "structural":
            engine.narrow(action)
        else:
            engine.mask_columns(action)
        if engine.recovery == "compensate":
            engine.swap_biases(action)

    def compensation_biases(self, engine: "PruningEngine", action: PruningAction) -> dict[tuple[int, str], torch.Tensor]:
        if engine.recovery != "compensate":
            return {}
        return {(i, cut.path): swap.compensated.detach()
                for (i, cut), swap in zip(engine.bias_cuts(engine.plan(action)), engine.bias_swaps(action))}

    @contextlib.contextmanager
    def student_view(self, engine: "PruningEngine", action: PruningAction) -> Iterator[None]:
        """Sliced weights (autograd views of the full Parameters) plus the compensation bias as the same function
        of the weights the engine computes."""
        engine.restore()
        layers = decoder_layers(engine.model)
        saved: list[tuple[nn.Module, object, object]] = []
        try:
            for i, cut in engine.cuts(action):
                linear = layers[i].get_submodule(cut.path)
                params = linear._parameters
                weight, bias = params["weight"], params["bias"]
                saved.append((linear, weight, bias))
                params["weight"] = weight[:cut.keep] if cut.dim == ROWS else weight[:, :cut.keep]
                if bias is not None and cut.dim == ROWS:
                    params["bias"] = bias[:cut.keep]
                if cut.dim == COLS and engine.recovery == "compensate":
                    mean = engine.moments.mean[f"{i}.{cut.path}"]
                    extra = (weight.double()[:, cut.keep:] @ mean.to(weight.device)[cut.keep:]).to(weight.dtype)
                    params["bias"] = extra if bias is None else bias + extra
            yield
        finally:
            for linear, weight, bias in reversed(saved):
                linear._parameters["weight"] = weight
                linear._parameters["bias"] = bias


def global_hint(engine: "PruningEngine") -> str:
    """What to do about a global plan an export refuses ('' for a uniform engine)."""
    return " (--allocation uniform gives a stock checkpoint)" if engine.allocation == "global" else ""
