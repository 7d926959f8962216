"""How many units each layer keeps for an action: the same share everywhere, or one ranking across layers.

Why global: layers are not equally fragile, so "FFN 20 %" should take more channels from robust
layers and fewer from fragile ones (FLAP, Wanda-sp). Scores of different layers are made comparable
by standardising them per layer (FLAP: (s - mean) / std over the layer's units), then the lowest
standardised units across all layers are removed, at least ``min_keep`` units staying in every layer.

Units are already sorted by importance inside each layer (the engine's reorder), and standardising is
monotone per layer, so every layer still loses a suffix: each action stays a prefix view per layer.
The total removed equals the uniform allocation's, so both spend the same parameter budget. KV groups
(3 per layer in SmolLM2: standardising 3 numbers says nothing) are ranked by the relative residual energy
their removal adds instead (``pruners.targets.heads.HeadsTarget.damage``).
"""
from __future__ import annotations

import heapq

import torch

ALLOCATIONS = ("uniform", "global")


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """Per-layer (s - mean) / std of a [layers, units] score matrix (FLAP's normalisation).

    A layer whose units all score alike gets std 1 (its scores become 0: neither favoured nor spared).
    """
    scores = scores.double()
    std = scores.std(dim=1, keepdim=True) if scores.shape[1] > 1 else torch.ones_like(scores[:, :1])
    return (scores - scores.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def global_kept(scores: torch.Tensor, remove: int, min_keep: int = 1, standardised: bool = True) -> tuple[int, ...]:
    """Units kept per layer after removing the ``remove`` lowest units across layers.

    ``scores`` [layers, units] are in the engine's unit order (descending importance within each layer);
    standardised per layer unless they are already comparable across layers (``standardised=False``).
    A heap over each layer's last kept unit removes suffixes only, so the kept units stay prefixes.
    """
    n_layers, units = scores.shape
    if not 0 < min_keep <= units:
        raise ValueError(f"min_keep must be in 1..{units}, got {min_keep}")
    remove = min(remove, n_layers * (units - min_keep))
    z = (standardise(scores) if standardised else scores.double()).tolist()
    kept = [units] * n_layers
    heap = [(z[i][units - 1], i) for i in range(n_layers) if units > min_keep]
    heapq.heapify(heap)
    for _ in range(remove):
        _, i = heapq.heappop(heap)
        kept[i] -= 1
        if kept[i] > min_keep:
            heapq.heappush(heap, (z[i][kept[i] - 1], i))
    return tuple(kept)


def check_allocation(allocation: str) -> str:
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation '{allocation}': choose from {', '.join(ALLOCATIONS)}")
    return allocation
