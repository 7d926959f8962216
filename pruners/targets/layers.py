"""Whole decoder layers: run fewer of them (``pruners.units.layers``), dropped runs optionally replaced by a fitted
linear map (``pruners.recovery.compensation``)."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from pruners.actions import PruningAction
from pruners.recovery.compensation import layer_runs
from pruners.cost import DecodeShape
from pruners.units.layers import contiguous_block_to_keep, layers_to_keep
from pruners.model_info import ModelDims
from pruners.plan import PruningPlan
from pruners.targets.base import PerLayerPlan, Target

if TYPE_CHECKING:
    from pruners.engine import PruningEngine


class LayersTarget(Target):
    name = "transformer_layers"
    score_key = "layers"
    removes_weights = True
    orders_layers = True

    def ladder_size(self, dims: ModelDims) -> int:
        return dims.num_layers

    def plan(self, engine: "PruningEngine", action: PruningAction) -> PruningPlan:
        """round(r x L) layers, never the first or last: the lowest-scoring ones (uniform), or the contiguous
        block whose input and output hidden states are most alike (global)."""
        if engine.allocation == "global":
            kept = contiguous_block_to_keep(action.intensity, engine.moments.cosine.tolist())
        else:
            kept = layers_to_keep(action.intensity, engine.scores.layers.tolist())
        return PruningPlan(action, kept=kept)

    def extra_params(self, engine: "PruningEngine", plan: PruningPlan) -> int:
        hidden = engine.dims.hidden
        return len(layer_runs(plan.kept, engine.dims.num_layers)) * (hidden * hidden + hidden)

    def effective_intensity(self, plan: PruningPlan, dims: ModelDims, prompt_tokens: int | None) -> float:
        return 1 - len(plan.kept) / dims.num_layers

    def decode_shape(self, shape: DecodeShape, plan: PruningPlan, structural: bool) -> DecodeShape:
        return dataclasses.replace(shape, layers=plan.kept)

    def magnitude(self, layer: nn.Module, dims: ModelDims) -> torch.Tensor:
        """A weak data-free proxy: the norm bound of how far the block can move the residual stream,
        ||W_o|| ||W_v diag(g_in)|| + ||W_down|| ||W_up diag(g_post)||."""
        attn, mlp = layer.self_attn, layer.mlp
        g_in = layer.input_layernorm.weight.float()
        g_post = layer.post_attention_layernorm.weight.float()
        attn_bound = attn.o_proj.weight.float().norm() * (attn.v_proj.weight.float() * g_in).norm()
        mlp_bound = mlp.down_proj.weight.float().norm() * (mlp.up_proj.weight.float() * g_post).norm()
        return attn_bound + mlp_bound

    def taylor(self, salience: dict[str, torch.Tensor], dims: ModelDims) -> torch.Tensor:
        """Every projection weight of the block."""
        return sum(v.sum() for v in salience.values())

    def prepare(self, engine: "PruningEngine", actions: Sequence[PruningAction], progress: bool) -> None:
        engine.prepare_replacements(actions, progress)

    def apply(self, engine: "PruningEngine", action: PruningAction, plan: PruningPlan) -> None:
        if engine.recovery == "compensate" and not engine.replacement_maps(action):
            engine.prepare([action])
        engine.drop_layers(plan.kept, engine.replacement_maps(action))

    @contextlib.contextmanager
    def student_view(self, engine: "PruningEngine", action: PruningAction) -> Iterator[None]:
        """The engine's layer drop and its (trainable) replacement maps."""
        with engine.pruned(action):
            yield

    def export_shapes(self, engine: "PruningEngine", plan: PruningPlan) -> dict[str, object]:
        if engine.recovery == "compensate":
            raise PerLayerPlan(f"{plan.action.label} with --recovery compensate replaces each run of dropped layers "
                              f"by a linear map of the hidden state, which a stock "
                              f"{type(engine.model.config).__name__} cannot express: export it with --recovery none, "
                              "or serve the compensated model through this tool's engine")
        return {"layers": list(plan.kept)}
