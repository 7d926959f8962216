"""Layer pruning: run fewer decoder layers, with cache indices kept consistent.

Why the remap: each LlamaAttention writes the KV cache at ``self.layer_idx`` and DynamicCache
is built with ``config.num_hidden_layers`` layers (LlamaModel also iterates
``layers[:config.num_hidden_layers]``). Dropping layers therefore means a shorter ModuleList,
attention ``layer_idx`` renumbered 0..k-1 and ``num_hidden_layers`` (and ``layer_types`` where
the config has them) set to k, so that ``get_seq_length()`` and the mask sizes stay right.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from pruners.model_info import decoder_layers


def layers_to_keep(intensity: float, layer_scores: Sequence[float]) -> tuple[int, ...]:
    """Indices of the kept layers: drop round(r * L) (at least one) lowest-scoring layers, never
    the first or the last."""
    n_layers = len(layer_scores)
    if n_layers < 3:
        raise ValueError("layer pruning needs at least 3 layers (the first and last are never dropped)")
    drop = min(max(1, round(intensity * n_layers)), n_layers - 2)
    middle = sorted(range(1, n_layers - 1), key=lambda i: (float(layer_scores[i]), i))
    dropped = set(middle[:drop])
    return tuple(i for i in range(n_layers) if i not in dropped)


def contiguous_block_to_keep(intensity: float, cosine: Sequence[Sequence[float]]) -> tuple[int, ...]:
    """Kept layers after dropping the contiguous block whose input and output hidden states are most alike.

    ``cosine[i][j]`` is the calibration mean cos(h_i, h_j) of the hidden states entering layers i and j
    (Gromov et al.'s angular distance; ReplaceMe replaces such a block by one linear map). The block of
    round(r * L) layers (at least one) never includes the first or the last layer.
    """
    n_layers = len(cosine) - 1
    if n_layers < 3:
        raise ValueError("layer pruning needs at least 3 layers (the first and last are never dropped)")
    drop = min(max(1, round(intensity * n_layers)), n_layers - 2)
    start = max(range(1, n_layers - drop), key=lambda i: (float(cosine[i][i + drop]), -i))
    return tuple(i for i in range(n_layers) if not start <= i < start + drop)


class LayerDropper:
    """Swaps ``model.model.layers`` for a cached shorter ModuleList and back."""

    def __init__(self, model: nn.Module) -> None:
        self.base = model.model
        self.config = model.config
        self.full = decoder_layers(model)
        self.layer_idx = tuple(layer.self_attn.layer_idx for layer in self.full)
        self.num_hidden_layers = self.config.num_hidden_layers
        self.layer_types = getattr(self.config, "layer_types", None)
        self._lists: dict[tuple, nn.ModuleList] = {}
        self.active = False

    def apply(self, keep: tuple[int, ...], replacements: Mapping[int, nn.Module] | None = None) -> None:
        """Run only the layers in ``keep``; ``replacements`` stand in for some of them (kept index -> module
        wrapping that layer, e.g. a compensation.ReplacedRun)."""
        replacements = replacements or {}
        key = (keep, tuple((i, id(m)) for i, m in sorted(replacements.items())))
        kept = self._lists.get(key)
        if kept is None:
            kept = self._lists[key] = nn.ModuleList(replacements.get(i, self.full[i]) for i in keep)
        self.active = True
        for new_idx, i in enumerate(keep):
            self.full[i].self_attn.__dict__["layer_idx"] = new_idx
        if self.layer_types is not None:
            self.config.layer_types = [self.layer_types[i] for i in keep]
        self.config.num_hidden_layers = len(keep)
        self.base.layers = kept

    def restore(self) -> None:
        if not self.active:
            return
        self.base.layers = self.full
        for layer, idx in zip(self.full, self.layer_idx):
            layer.self_attn.__dict__["layer_idx"] = idx
        self.config.num_hidden_layers = self.num_hidden_layers
        if self.layer_types is not None:
            self.config.layer_types = self.layer_types
        self.active = False
