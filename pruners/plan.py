"""What one action removes, resolved against a model's shapes and importance scores."""
from __future__ import annotations

from dataclasses import dataclass

from pruners.actions import PruningAction
from pruners.units.kv_cache import KVCachePruner
from pruners.targets import get_target


@dataclass(frozen=True)
class PruningPlan:
    """Kept units of the action's target (None = untouched). Units are prefixes after the importance reorder.

    ``kept`` is read under the target's ``plan_key`` as well (``plan.ffn_kept``, ``plan.kv_groups_kept``,
    ``plan.layers_kept``: per layer, or the kept layer indices); another target's key reads None.
    """
    action: PruningAction
    kept: tuple[int, ...] | None = None
    kv: KVCachePruner | None = None                 # the cache pruner the generation loop runs after prefill
    extra_params: int = 0                           # parameters the action's compensation adds (read every token)

    def __getattr__(self, name: str):
        if name.endswith("_kept"):
            return self.kept if get_target(self.action.target).plan_key == name else None
        raise AttributeError(f"'PruningPlan' has no attribute '{name}'")

    def stored(self) -> dict[str, list[int]]:
        """The kept sizes under the target's key (a healed sidecar's stored plan); empty when nothing is kept."""
        key = get_target(self.action.target).plan_key
        return {key: list(self.kept)} if key and self.kept is not None else {}
