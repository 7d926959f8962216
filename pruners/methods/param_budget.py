"""Parameter budgets: how many non-embedding parameters a pruned model has lost, and which
engine action of a given target removes a requested share.

Why non-embedding: width and depth pruning never touch the (tied) embedding and lm_head, so a
budget over all parameters would cap every method at ~79% of SmolLM2 and hide how much of the
decoder each method removes. Budget = removed / non-embedding parameters of the dense model.

How a budget maps to an engine action: every target has a ladder of achievable removals (one
FFN channel in every layer, one KV group in one layer, one whole layer). The engine's own
rounding (``ffn_kept``, ``allocate_group_removals``, ``layers_to_keep``) turns intensity
``k / units`` into exactly ``k`` steps, so ``match_budget`` bisects over ``k``, measuring each
candidate by applying it and counting the parameters the pruned forward really uses, and
returns the step closest to the budget: off by at most half a step, unless the budget lies
outside the ladder (below one unit, or beyond the engine's caps), which is logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from pruners import NONE, PruningAction, PruningEngine
from pruners.targets import all_targets, get_target

log = logging.getLogger(__name__)

WIDTH_AND_DEPTH_TARGETS = tuple(t.name for t in all_targets() if t.removes_weights)


@dataclass(frozen=True)
class ParameterCount:
    total: int        # every parameter once (tied embeddings counted once)
    embedding: int    # input embedding + untied output embedding

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(model: nn.Module) -> ParameterCount:
    """Parameters of the model as it is now (a structurally pruned model counts its prefix views)."""
    total = sum(p.numel() for p in model.parameters())   # de-duplicates tied weights
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    embedding = embed.numel() + (0 if head.data_ptr() == embed.data_ptr() else head.numel())
    return ParameterCount(total, embedding)


@dataclass(frozen=True)
class BudgetMatch:
    action: PruningAction
    budget: float        # requested share of non-embedding parameters removed
    removed: float       # share the action really removes
    params: int          # parameters left (all, embeddings included)
    step: float          # share one unit of the target removes: |removed - budget| <= step / 2 inside the ladder


def ladder_size(engine: PruningEngine, target: str) -> int:
    """Number of removal steps of a target (intensity k / size removes exactly k steps)."""
    kind = get_target(target)
    if kind.removes_weights:
        return kind.ladder_size(engine.dims)
    raise ValueError(f"target '{target}' removes no parameters: use one of {', '.join(WIDTH_AND_DEPTH_TARGETS)}")


def removed_share(engine: PruningEngine, action: PruningAction) -> tuple[float, int]:
    """(share of non-embedding parameters removed, parameters left) under ``action``, measured by
    applying it; the engine is left dense."""
    if engine.mode != "structural":
        raise ValueError("parameter budgets need a structural engine: mask mode removes no parameters")
    with engine.pruned(NONE):
        dense = count_parameters(engine.model)
    with engine.pruned(action):
        left = count_parameters(engine.model).total
    return (dense.total - left) / dense.non_embedding, left


def match_budget(engine: PruningEngine, target: str, budget: float) -> BudgetMatch:
    """The action of ``target`` whose measured removal is closest to ``budget``."""
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be a share of non-embedding parameters in (0, 1), got {budget}")
    size = ladder_size(engine, target)

    def candidate(k: int) -> tuple[PruningAction, float, int]:
        action = PruningAction(target, k / size)
        return (action, *removed_share(engine, action))

    lo, hi = 1, size - 1   # intensity must lie in (0, 1); the engine's own caps stop the ladder earlier
    while lo < hi:         # smallest k whose removal reaches the budget (removal grows with k)
        mid = (lo + hi) // 2
        if candidate(mid)[1] >= budget:
            hi = mid
        else:
            lo = mid + 1
    options = [candidate(k) for k in sorted({max(lo - 1, 1), lo})]
    action, removed, params = min(options, key=lambda o: (abs(o[1] - budget), o[0].intensity))
    step = candidate(1)[1]   # one unit's share: the ladder's resolution
    if abs(removed - budget) > step / 2 + 1e-9:
        log.warning("%s cannot remove %.1f%% of non-embedding parameters: the closest step, %s, removes %.1f%%",
                    target, 100 * budget, action.label, 100 * removed)
    return BudgetMatch(action, budget, removed, params, step)
