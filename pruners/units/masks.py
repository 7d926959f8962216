"""Mask mode: zero pruned units with forward pre-hooks instead of slicing.

QUALITY ONLY, NO SPEEDUP: the full matrices are still multiplied; the hooks only zero the
input columns of o_proj (pruned heads) or down_proj (pruned FFN channels). Masking those inputs
is exactly what structural slicing computes, so masks validate quality cheaply and serve as a
reference that the slicing is right.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class InputMasks:
    """Registers ``x * mask`` pre-hooks (keep the first k input features) and removes them."""

    def __init__(self) -> None:
        self._vectors: dict[tuple[int, int], torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def _vector(self, linear: nn.Linear, keep: int) -> torch.Tensor:
        key = (id(linear), keep)
        vec = self._vectors.get(key)
        if vec is None:
            with torch.inference_mode(False):
                vec = torch.zeros(linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
                vec[:keep] = 1
            self._vectors[key] = vec
        return vec

    def add(self, linear: nn.Linear, keep: int) -> None:
        vec = self._vector(linear, keep)
        self._handles.append(linear.register_forward_pre_hook(lambda _m, args: (args[0] * vec, *args[1:])))

    def clear(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
