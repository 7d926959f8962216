"""Attention heads, removed by whole KV groups (``pruners.units.heads``) so GQA shapes stay valid."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pruners.actions import PruningAction
from pruners.allocation import global_kept
from pruners.units.heads import allocate_group_removals, attention_cuts, groups_to_remove, o_proj_columns, reorder_kv_groups
from pruners.model_info import ModelDims
from pruners.plan import PruningPlan
from pruners.units.slicing import Cut
from pruners.targets.base import PerLayerPlan
from pruners.targets.width import WidthTarget, global_hint

if TYPE_CHECKING:
    from pruners.engine import PruningEngine


class HeadsTarget(WidthTarget):
    name = "attention_heads"
    score_key = "kv_groups"
    column_projection = "self_attn.o_proj"

    def units(self, dims: ModelDims) -> int:
        return dims.num_kv_heads

    def layer_cuts(self, kept: int, dims: ModelDims) -> list[Cut]:
        return attention_cuts(kept, dims)

    def ladder_size(self, dims: ModelDims) -> int:
        return dims.num_layers * dims.num_kv_heads

    def plan(self, engine: "PruningEngine", action: PruningAction) -> PruningPlan:
        """round(r x all groups) removed; uniform: spread evenly, the rest from the lowest-scoring layers;
        global: by the relative residual energy each group's removal adds."""
        r, dims = action.intensity, engine.dims
        if engine.allocation == "global":
            kept = global_kept(self.damage(engine), groups_to_remove(r, dims), standardised=False)
        else:
            kept = allocate_group_removals(r, dims, engine.scores.layers.tolist())
        return PruningPlan(action, kept=kept)

    @staticmethod
    def damage(engine: "PruningEngine") -> torch.Tensor:
        """[layers, groups]: what removing each KV group adds to the residual stream, relative to its energy.

        Per o_proj input column j: E[x_j^2] (Var(x_j) once its mean is compensated) * ||W_o[:, j]||^2, summed
        per group and divided by E[||h||^2] of the layer's input. With 3 groups per layer (SmolLM2) a
        per-layer standardisation says nothing; the relative energy is comparable across layers.
        """
        dims, moments, rows = engine.dims, engine.moments, []
        for i in range(dims.num_layers):
            key = f"{i}.self_attn.o_proj"
            second = moments.square[key]
            if engine.recovery == "compensate":
                second = (second - moments.mean[key].pow(2)).clamp_min(0)
            w_sq = engine.prefix_linear(i, "self_attn.o_proj").weight.detach().double().pow(2).sum(0).cpu()
            rows.append((second * w_sq).reshape(dims.num_kv_heads, -1).sum(1) / moments.residual[i])
        return torch.stack(rows)

    def magnitude(self, layer: nn.Module, dims: ModelDims) -> torch.Tensor:
        """||v_g||_F * ||o_:,g||_F (q/k only re-weight, v and o carry the signal)."""
        attn = layer.self_attn
        v_sq = (attn.v_proj.weight.float().norm(dim=1) ** 2).reshape(dims.num_kv_heads, -1).sum(dim=1)
        o_sq = (attn.o_proj.weight.float().norm(dim=0) ** 2).reshape(dims.num_kv_heads, -1).sum(dim=1)
        return (v_sq * o_sq).sqrt()

    def reorder(self, layer: nn.Module, index: int, scores: torch.Tensor, dims: ModelDims
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        order = torch.argsort(scores, descending=True, stable=True)
        reorder_kv_groups(layer.self_attn, order, dims)
        return scores[order], {f"{index}.{self.column_projection}": o_proj_columns(order, dims)}

    def export_shapes(self, engine: "PruningEngine", plan: PruningPlan) -> dict[str, object]:
        groups = set(plan.kept)
        if len(groups) > 1:
            uniform = "" if engine.allocation == "global" else (
                f": export one of {', '.join(self.uniform_intensities(engine))} instead (the same KV groups removed "
                "from every layer)")
            raise PerLayerPlan(f"{plan.action.label} keeps {sorted(groups)} KV groups depending on the layer, but a "
                              f"stock {type(engine.model.config).__name__} has one head count for all layers{uniform}"
                              f"{global_hint(engine)}")
        return {"kv_groups": groups.pop()}

    def uniform_intensities(self, engine: "PruningEngine") -> list[str]:
        """Intensities whose plan removes the same KV groups count from every layer."""
        groups = engine.dims.num_kv_heads
        labels = []
        for k in range(1, groups):
            for digits in (2, 3, 4, 6):
                action = PruningAction(self.name, round(k / groups, digits))
                if len(set(engine.plan(action).kept)) == 1:
                    labels.append(action.label)
                    break
        return labels

