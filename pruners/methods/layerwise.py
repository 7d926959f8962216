"""Layer-by-layer calibration: capture what the model feeds its first decoder layer, then run layers alone.

Why: sequential methods (SparseGPT, the layer replacement fits) need each layer's inputs as the
(partly pruned) model produces them. Position embeddings and the mask are the same for every layer,
so after one embedding-only forward per prompt only the hidden states change from layer to layer;
that keeps the walk linear in depth instead of re-running the model up to each layer.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from pruners.model_info import decoder_layers


class _Stop(Exception):
    """Ends a calibration forward once the first decoder layer's inputs are captured."""


LayerInputs = list[tuple[tuple, dict]]     # per calibration prompt: a decoder layer's (args, kwargs)


@torch.no_grad()
def first_layer_inputs(model: nn.Module, calibration_ids: Sequence[torch.Tensor]) -> LayerInputs:
    """What the model passes to its first decoder layer for each prompt (hidden states, position
    embeddings, mask, ...): one embedding-only forward per prompt, stopped at the layer."""
    captured: LayerInputs = []

    def grab(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in calibration_ids:
            with contextlib.suppress(_Stop):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def next_layer_inputs(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Run ``layer`` (already pruned) on its inputs: its outputs are the next layer's hidden states."""
    out = []
    for args, kwargs in inputs:
        hidden = run_layer(layer, hidden_of(args, kwargs), (args, kwargs))
        out.append(((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden}))
    return out


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states in a decoder layer's captured (args, kwargs)."""
    return args[0] if args else kwargs["hidden_states"]


def run_layer(layer: nn.Module, hidden: torch.Tensor, captured: tuple[tuple, dict]) -> torch.Tensor:
    """``layer`` on ``hidden`` with the rest of a captured call (mask, position embeddings)."""
    args, kwargs = captured
    result = layer(hidden, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": hidden})
    return result[0] if isinstance(result, tuple) else result
