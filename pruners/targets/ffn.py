"""FFN channels: channel j is row j of gate/up and column j of down (``pruners.units.ffn``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pruners.actions import PruningAction
from pruners.allocation import global_kept
from pruners.units.ffn import ffn_cuts, ffn_kept, reorder_ffn_channels
from pruners.model_info import ModelDims
from pruners.plan import PruningPlan
from pruners.units.slicing import Cut
from pruners.targets.base import PerLayerPlan
from pruners.targets.width import WidthTarget, global_hint

if TYPE_CHECKING:
    from pruners.engine import PruningEngine


class FFNTarget(WidthTarget):
    name = "ffn_neurons"
    score_key = "ffn"
    column_projection = "mlp.down_proj"

    def units(self, dims: ModelDims) -> int:
        return dims.intermediate

    def layer_cuts(self, kept: int, dims: ModelDims) -> list[Cut]:
        return ffn_cuts(kept)

    def ladder_size(self, dims: ModelDims) -> int:
        return dims.intermediate                    # one channel from every layer per step

    def plan(self, engine: "PruningEngine", action: PruningAction) -> PruningPlan:
        """round(r x I) channels from every layer (uniform), or as many in total from the lowest standardised
        scores across layers (global)."""
        dims = engine.dims
        per_layer = ffn_kept(action.intensity, dims.intermediate)
        if engine.allocation == "global":
            kept = global_kept(engine.scores.ffn, (dims.intermediate - per_layer) * dims.num_layers)
        else:
            kept = (per_layer,) * dims.num_layers
        return PruningPlan(action, kept=kept)

    def magnitude(self, layer: nn.Module, dims: ModelDims) -> torch.Tensor:
        """||gate_j|| * ||up_j|| * ||down_:,j||."""
        mlp = layer.mlp
        return (mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1)
                * mlp.down_proj.weight.float().norm(dim=0))

    def reorder(self, layer: nn.Module, index: int, scores: torch.Tensor, dims: ModelDims
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        order = torch.argsort(scores, descending=True, stable=True)
        reorder_ffn_channels(layer.mlp, order)
        return scores[order], {f"{index}.{self.column_projection}": order}

    def export_shapes(self, engine: "PruningEngine", plan: PruningPlan) -> dict[str, object]:
        ffn = set(plan.kept)
        if len(ffn) > 1:
            raise PerLayerPlan(f"{plan.action.label} keeps {min(ffn)}..{max(ffn)} FFN channels depending on the layer, "
                              f"but a stock {type(engine.model.config).__name__} has one intermediate_size"
                              f"{global_hint(engine)}")
        return {"ffn": ffn.pop()}
