"""Bytes read per decoded token: the ideal speedup of memory-bound single-stream decoding.

Counts every weight a decode step reads (the tied lm_head in full, every token; the embedding
as one row) plus the K/V cache read by attention. Mask mode reads the dense weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from pruners.model_info import ModelDims
from pruners.plan import PruningPlan


@dataclass(frozen=True)
class DecodeCost:
    weight_params: int      # weight elements read per decoded token
    cache_elements: int     # K/V elements read per decoded token (at the given cache length)
    bytes_per_element: int

    @property
    def bytes(self) -> int:
        return (self.weight_params + self.cache_elements) * self.bytes_per_element


def layer_params(dims: ModelDims, kv_groups: int, ffn: int) -> int:
    q = kv_groups * dims.group_size * dims.head_dim
    kv = kv_groups * dims.head_dim
    attention = dims.hidden * q * 2 + dims.hidden * kv * 2          # q, o and k, v
    return attention + 3 * dims.hidden * ffn + 2 * dims.hidden       # gate/up/down + 2 norms


def decode_cost(dims: ModelDims, plan: PruningPlan, prompt_tokens: int = 0, generated: float = 0.0,
                bytes_per_element: int = 4, structural: bool = True) -> DecodeCost:
    """Cost of one decode step after a ``prompt_tokens`` prefill and ``generated`` new tokens.

    Heads/FFN plans only save anything when ``structural``; layer and KV plans always do.
    """
    dense_groups, dense_ffn = (dims.num_kv_heads,) * dims.num_layers, (dims.intermediate,) * dims.num_layers
    groups = plan.kv_groups_kept if structural and plan.kv_groups_kept else dense_groups
    ffn = plan.ffn_kept if structural and plan.ffn_kept else dense_ffn
    layers = range(dims.num_layers) if plan.layers_kept is None else plan.layers_kept
    cached = (prompt_tokens if plan.kv is None else plan.kv.budget(prompt_tokens)) + generated
    params = sum(layer_params(dims, groups[i], ffn[i]) for i in layers)
    params += dims.vocab * dims.hidden + dims.hidden * 2                # lm_head, embedding row, final norm
    params += plan.extra_params                                         # compensation biases / replacement maps
    cache = sum(2 * groups[i] * dims.head_dim for i in layers) * cached
    return DecodeCost(int(params), int(round(cache)), bytes_per_element)


def ideal_speedup(dense: DecodeCost, pruned: DecodeCost) -> float:
    return dense.bytes / pruned.bytes
