"""What one action removes, resolved against a model's shapes and importance scores."""
from __future__ import annotations

from dataclasses import dataclass

from pruners.actions import PruningAction
from pruners.kv_cache import KVCachePruner


@dataclass(frozen=True)
class PruningPlan:
    """Per-layer kept sizes (None = untouched). Units are prefixes after the importance reorder."""
    action: PruningAction
    kv_groups_kept: tuple[int, ...] | None = None   # per layer
    ffn_kept: tuple[int, ...] | None = None         # per layer
    layers_kept: tuple[int, ...] | None = None      # indices into the full layer list
    kv: KVCachePruner | None = None
    extra_params: int = 0                           # parameters the action's compensation adds (read every token)
