"""First-order Taylor importance (LLM-Pruner style) in the engine's ImportanceScores format.

Removing a weight w changes the loss by about |w * dL/dw| (first-order Taylor expansion), so a
unit's importance is that salience summed over every weight the unit owns, with dL/dw summed
over a calibration set (language-modelling loss, one sequence at a time):

- FFN channel j: row j of gate_proj and up_proj, column j of down_proj;
- KV group g: the rows of its KV head in k_proj/v_proj, the rows of its query heads in q_proj
  and the matching columns of o_proj (a whole group, so GQA shapes stay valid);
- layer: every projection weight of the block
(each target's ``taylor``: width targets sum over the projections their cuts span).

It is registered as the engine criterion ``"taylor"`` (``pruners.scoring.importance.IMPORTANCE``), so the
engine caches its scores on disk like every other criterion and a repeated sweep does not pay
the backward passes again.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from pruners.scoring.criteria import Statistics, Taylor, score_targets
from pruners.model_info import decoder_layers
from pruners.scoring.score_cache import ImportanceScores

log = logging.getLogger(__name__)

CRITERION = "taylor"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _salience(layer: nn.Module, path: str) -> torch.Tensor:
    weight = layer.get_submodule(path).weight
    return (weight.detach() * weight.grad).abs().double().cpu()


def _unit_scores(model: nn.Module) -> ImportanceScores:
    salience = [{path: _salience(layer, path) for path in PROJECTIONS} for layer in decoder_layers(model)]
    return score_targets(CRITERION, (Taylor(),), model, Statistics(salience=salience))


def compute_taylor_scores(model: nn.Module, calibration_ids: Sequence[torch.Tensor]) -> ImportanceScores:
    """Accumulate dL/dW over the calibration sequences, then score units (gradients are freed)."""
    if not calibration_ids:
        raise ValueError("Taylor importance needs calibration prompts")
    weights = [layer.get_submodule(p).weight for layer in decoder_layers(model) for p in PROJECTIONS]
    flags = [w.requires_grad for w in weights]
    device = weights[0].device
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
                w.grad = None
            for ids in calibration_ids:
                ids = ids.to(device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            scores = _unit_scores(model)
    finally:
        for w, flag in zip(weights, flags):
            w.grad = None
            w.requires_grad_(flag)
    log.info("taylor importance from %d calibration tokens", sum(ids.numel() for ids in calibration_ids))
    return scores

