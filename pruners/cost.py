"""Bytes read per decoded token: the ideal speedup of memory-bound single-stream decoding.

Counts every weight a decode step reads (the tied lm_head in full, every token; the embedding
as one row) plus the K/V cache read by attention. Mask mode reads the dense weights. What a plan changes
(units per layer, layers run, cache length) comes from its target's ``decode_shape``. Weights computed in another
dtype (``runtime.dtype``: int8, bfloat16) count at that dtype's size while the K/V cache keeps the model's
(``DecodeCost.bytes_at``): at int8 the cache is a larger share of the bytes, so an action's ideal differs.
"""
from __future__ import annotations

from dataclasses import dataclass

from pruners.model_info import ModelDims


@dataclass(frozen=True)
class DecodeCost:
    weight_params: int      # weight elements read per decoded token
    cache_elements: int     # K/V elements read per decoded token (at the given cache length)
    bytes_per_element: int  # the model's element size: its K/V cache's, and its weights' as loaded

    @property
    def bytes(self) -> int:
        return (self.weight_params + self.cache_elements) * self.bytes_per_element

    def bytes_at(self, weight_bytes: float | None = None) -> float:
        """Bytes read with the weights at ``weight_bytes`` per element (None: the model's own); the cache as it is."""
        if weight_bytes is None:
            return self.bytes
        return self.weight_params * weight_bytes + self.cache_elements * self.bytes_per_element


@dataclass(frozen=True)
class DecodeShape:
    """What one decode step runs: KV groups and FFN channels per layer, the layers run, prompt tokens cached."""
    kv_groups: tuple[int, ...]
    ffn: tuple[int, ...]
    layers: tuple[int, ...]
    cached_prompt: int

    @classmethod
    def dense(cls, dims: ModelDims, prompt_tokens: int) -> "DecodeShape":
        return cls((dims.num_kv_heads,) * dims.num_layers, (dims.intermediate,) * dims.num_layers,
                   tuple(range(dims.num_layers)), prompt_tokens)


def layer_params(dims: ModelDims, kv_groups: int, ffn: int) -> int:
    q = kv_groups * dims.group_size * dims.head_dim
    kv = kv_groups * dims.head_dim
    attention = dims.hidden * q * 2 + dims.hidden * kv * 2          # q, o and k, v
    return attention + 3 * dims.hidden * ffn + 2 * dims.hidden       # gate/up/down + 2 norms


def decode_cost(dims: ModelDims, shape: DecodeShape, generated: float = 0.0, bytes_per_element: int = 4,
                extra_params: int = 0) -> DecodeCost:
    """Cost of one decode step of ``shape`` after ``generated`` new tokens (``extra_params``: compensation)."""
    layers, groups, ffn = shape.layers, shape.kv_groups, shape.ffn
    cached = shape.cached_prompt + generated
    params = sum(layer_params(dims, groups[i], ffn[i]) for i in layers)
    params += dims.vocab * dims.hidden + dims.hidden * 2                # lm_head, embedding row, final norm
    params += extra_params                                              # compensation biases / replacement maps
    cache = sum(2 * groups[i] * dims.head_dim for i in layers) * cached
    return DecodeCost(int(params), int(round(cache)), bytes_per_element)


def ideal_speedup(dense: DecodeCost, pruned: DecodeCost, weight_bytes: float | None = None,
                  dense_weight_bytes: float | None = None) -> float:
    """Bytes dense / pruned, the pruned weights at ``weight_bytes`` per element and the dense ones at
    ``dense_weight_bytes`` (each None: the model's own)."""
    return dense.bytes_at(dense_weight_bytes) / pruned.bytes_at(weight_bytes)
