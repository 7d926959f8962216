"""Attention-head pruning by whole KV groups, so GQA shapes stay valid.

A KV group is one KV head plus the ``group_size`` query heads that read it (``repeat_kv`` maps
query head h to KV head h // group_size). Removing a whole group keeps
``num_key_value_groups`` unchanged, which is the only head-count attribute LlamaAttention's
forward uses (it reshapes with ``-1`` heads), for SmolLM2 (3 groups) and Llama-3.2-1B (8).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pruners.model_info import ModelDims
from pruners.units.slicing import COLS, ROWS, Cut


def _group_index(order: torch.Tensor, width: int) -> torch.Tensor:
    """Row (or column) indices of the blocks in ``order``, each block ``width`` wide."""
    return (order[:, None] * width + torch.arange(width, device=order.device)).reshape(-1)


def o_proj_columns(order: torch.Tensor, dims: ModelDims) -> torch.Tensor:
    """The o_proj input columns (query-head channels) of the KV groups in ``order``."""
    return _group_index(order, dims.group_size * dims.head_dim)


@torch.no_grad()
def reorder_kv_groups(attn: nn.Module, order: torch.Tensor, dims: ModelDims) -> None:
    """Permute KV groups in place (new group i = old group order[i]); outputs are unchanged."""
    kv_width = dims.head_dim
    q_idx = o_proj_columns(order.to(attn.q_proj.weight.device), dims)
    kv_idx = _group_index(order.to(attn.k_proj.weight.device), kv_width)
    for proj, idx in ((attn.q_proj, q_idx), (attn.k_proj, kv_idx), (attn.v_proj, kv_idx)):
        proj.weight.copy_(proj.weight[idx])
        if proj.bias is not None:
            proj.bias.copy_(proj.bias[idx])
    attn.o_proj.weight.copy_(attn.o_proj.weight[:, q_idx])


def attention_cuts(kept_groups: int, dims: ModelDims) -> list[Cut]:
    """The four projections of one layer cut to its first ``kept_groups`` KV groups."""
    q_keep = kept_groups * dims.group_size * dims.head_dim
    kv_keep = kept_groups * dims.head_dim
    return [Cut("self_attn.q_proj", ROWS, q_keep), Cut("self_attn.k_proj", ROWS, kv_keep),
            Cut("self_attn.v_proj", ROWS, kv_keep), Cut("self_attn.o_proj", COLS, q_keep)]


def groups_to_remove(intensity: float, dims: ModelDims) -> int:
    """round(r * all KV groups) removed (at least one), every layer keeping one group."""
    if dims.num_kv_heads < 2:
        raise ValueError("heads pruning needs at least 2 KV groups per layer (model has 1)")
    total = dims.num_layers * dims.num_kv_heads
    return min(max(1, round(intensity * total)), dims.num_layers * (dims.num_kv_heads - 1))


def allocate_group_removals(intensity: float, dims: ModelDims, layer_scores: Sequence[float]) -> tuple[int, ...]:
    """KV groups kept per layer for an intensity.

    SmolLM2 has only 3 groups per layer, so a per-layer rate would round to 0 or 1 group: we
    remove round(r * layers * groups) groups in total (at least one), spread uniformly, the
    remainder going to the layers with the lowest ``layer_scores``; every layer keeps one group.
    """
    per_layer_max = dims.num_kv_heads - 1
    remove = groups_to_remove(intensity, dims)
    removed = [min(remove // dims.num_layers, per_layer_max)] * dims.num_layers
    left = remove - sum(removed)
    least_important_first = sorted(range(dims.num_layers), key=lambda i: (float(layer_scores[i]), i))
    while left:
        for layer in least_important_first:
            if left and removed[layer] < per_layer_max:
                removed[layer] += 1
                left -= 1
    return tuple(dims.num_kv_heads - r for r in removed)
