"""KV-cache entries: the cache is shortened after prefill (``pruners.units.kv_cache``); no weight changes."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pruners.actions import PruningAction
from pruners.cost import DecodeShape
from pruners.units.kv_cache import KVCachePruner
from pruners.model_info import ModelDims
from pruners.plan import PruningPlan
from pruners.targets.base import ExportError, Target

if TYPE_CHECKING:
    from pruners.engine import PruningEngine


class KVCacheTarget(Target):
    name = "kv_cache"
    while_generating = True

    def plan(self, engine: "PruningEngine", action: PruningAction) -> PruningPlan:
        return PruningPlan(action, kv=KVCachePruner(action.intensity, **engine.kv_settings))

    def effective_intensity(self, plan: PruningPlan, dims: ModelDims, prompt_tokens: int | None) -> float:
        """0 below the pruner's minimum prompt length; nominal without a length."""
        if not prompt_tokens:
            return plan.action.intensity
        return 1 - plan.kv.budget(prompt_tokens) / prompt_tokens

    def decode_shape(self, shape: DecodeShape, plan: PruningPlan, structural: bool) -> DecodeShape:
        return dataclasses.replace(shape, cached_prompt=plan.kv.budget(shape.cached_prompt))

    def export_shapes(self, engine: "PruningEngine", plan: PruningPlan) -> dict[str, object]:
        raise ExportError(f"{plan.action.label} prunes the KV cache while generating and removes no weights: there "
                          "is nothing to export (use attention_heads, ffn_neurons or transformer_layers)")
