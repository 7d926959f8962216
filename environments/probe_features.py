"""Per-prompt features read from the request's own dense prefill (``--state-features probe``, issue 27).

Why: syntax features (``nlp_analyzer``) predict per-prompt damage at Spearman ~0; what the model itself
does with the prompt predicts it better. Everything here is computed from one ``PrefillRecord``
(``pruners.scoring.probe.PrefillRecorder`` on the prefill the request runs anyway), plus a few rows of the
language-model head; no extra forward through the decoder.

Three groups:
- ``dense``: eight statistics of the dense prefill (log length; NLL, entropy and top-1 probability over
  the prompt's last positions; entropy and top-1 margin at the last position; log residual norms early
  and at the output);
- ``lens``: entropy and top-1 margin of the last position read through the final norm and ``lm_head`` at
  intermediate layers (logit lens): how settled the model is before its last blocks;
- ``inject``: per action, the error the action injects into the residual stream on this prompt, as an
  energy share summed over layers (log): for FFN channels / KV groups the removed input columns'
  contribution minus the compensation bias, ``||W[:, removed] (x[removed] - mu[removed])||^2 / ||h||^2``;
  for dropped layers, what the replacement map (or the identity) misses of the dense run's output.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pruners import PruningAction, PruningEngine
from pruners.recovery.compensation import layer_runs
from pruners.model_info import decoder_layers
from pruners.scoring.probe import FFN_INPUT, HEADS_INPUT, PrefillRecord, tail

VERSION = 1                     # of these definitions: stored features of another version are recomputed
PROBED = ("attention_heads", "ffn_neurons", "transformer_layers")   # targets with an injected-error feature
DENSE = ("log_tokens", "prompt_nll", "prompt_entropy", "prompt_top1", "last_entropy", "last_margin",
         "log_norm_early", "log_norm_final")
LENS_FRACTIONS = (0.5, 0.75)    # intermediate layers read through the head, as a share of the depth
PROMPT_POSITIONS = 16           # prompt positions whose predictions the dense statistics read
EPS = 1e-12


@dataclass(frozen=True)
class ProbeFeatures:
    names: tuple[str, ...]
    values: tuple[float, ...]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.values))


def probed(actions: Sequence[PruningAction]) -> list[PruningAction]:
    """The actions that get an ``inject.<label>`` feature, in their order."""
    return [a for a in actions if a.target in PROBED]


def state_names(stored: dict[str, float], actions: Sequence[PruningAction]) -> list[str]:
    """The probe features a state reads from a prompt's stored ones: the prompt's own (dense, lens) and one
    injected error per probed action of the run, in the run's action order (a cache measured for a larger
    action space holds more)."""
    return [n for n in stored if not n.startswith("inject.")] + [f"inject.{a.label}" for a in probed(actions)]


def lens_layers(num_layers: int) -> list[int]:
    return sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in LENS_FRACTIONS})


def feature_names(num_layers: int, actions: Sequence[PruningAction]) -> tuple[str, ...]:
    lens = [f"lens{i}.{stat}" for i in lens_layers(num_layers) for stat in ("entropy", "margin")]
    return (*(f"dense.{n}" for n in DENSE), *lens, *(f"inject.{a.label}" for a in actions))


def _entropy_top(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy, top-1 probability, top-1 minus top-2 log-probability) per row."""
    logp = F.log_softmax(logits.float(), dim=-1)
    top = logp.topk(2, dim=-1).values
    return -(logp.exp() * logp).sum(-1), top[:, 0].exp(), top[:, 0] - top[:, 1]


@torch.inference_mode()
def dense_statistics(record: PrefillRecord, input_ids: torch.Tensor, model) -> list[float]:
    ids = input_ids.reshape(-1).to(record.final.device)
    n = ids.numel()
    last = record.final[-1:]
    k = min(PROMPT_POSITIONS, n - 1)
    if k >= 1:
        logits = model.lm_head(record.final[n - 1 - k:])        # k predictions of prompt tokens, then the last
        logp = F.log_softmax(logits[:-1].float(), dim=-1)
        nll = float(-logp.gather(1, ids[n - k:].view(-1, 1)).mean())
        entropy, top1, margin = _entropy_top(logits)
        prompt_entropy, prompt_top1 = float(entropy[:-1].mean()), float(top1[:-1].mean())
    else:
        entropy, top1, margin = _entropy_top(model.lm_head(last))
        nll, prompt_entropy, prompt_top1 = 0.0, float(entropy[-1]), float(top1[-1])
    early = min(3, len(record.residual) - 2)
    return [math.log(n), nll, prompt_entropy, prompt_top1, float(entropy[-1]), float(margin[-1]),
            math.log(float(tail(record.residual[early]).norm(dim=-1).mean()) + EPS),
            math.log(float(tail(record.residual[-1]).norm(dim=-1).mean()) + EPS)]


@torch.inference_mode()
def lens_statistics(record: PrefillRecord, model) -> list[float]:
    out: list[float] = []
    for i in lens_layers(len(record.residual) - 1):
        entropy, _, margin = _entropy_top(model.lm_head(model.model.norm(record.residual[i][-1:])))
        out += [float(entropy[0]), float(margin[0])]
    return out


@torch.inference_mode()
def injected_error(record: PrefillRecord, engine: PruningEngine, action: PruningAction) -> float:
    """Energy share (summed over layers) of the error ``action`` adds to the residual stream on this prompt."""
    plan = engine.plan(action)
    layers = decoder_layers(engine.model)
    means = engine.moments.mean if engine.recovery == "compensate" and engine.moments is not None else None
    total = 0.0
    if plan.ffn_kept is not None or plan.kv_groups_kept is not None:
        path = FFN_INPUT if plan.ffn_kept is not None else HEADS_INPUT
        dims = engine.dims
        kept = plan.ffn_kept or [g * dims.group_size * dims.head_dim for g in plan.kv_groups_kept]
        for i, (layer, k) in enumerate(zip(layers, kept)):
            weight = layer.get_submodule(path).weight
            x = tail(record.inputs[i, path])[:, k:]
            if x.shape[1] == 0:
                continue
            if means is not None:
                x = x - means[f"{i}.{path}"][k:].to(x.device, x.dtype)
            err = x @ weight.detach()[:, k:].float().T
            total += float(err.pow(2).sum() / tail(record.residual[i]).pow(2).sum().clamp_min(EPS))
    elif plan.layers_kept is not None:
        maps = engine.replacement_maps(action) if engine.recovery == "compensate" else {}
        for first, last in layer_runs(plan.layers_kept, len(layers)):
            h, target = tail(record.residual[first]), tail(record.residual[last + 1])
            run = maps.get(first - 1)
            predicted = run.map(h.to(run.map.weight.dtype)).float() if run is not None else h
            total += float((target - predicted).pow(2).sum() / target.pow(2).sum().clamp_min(EPS))
    return math.log(total + EPS)


def probe_features(record: PrefillRecord, input_ids: torch.Tensor, engine: PruningEngine,
                   actions: Sequence[PruningAction]) -> ProbeFeatures:
    """Every probe feature of one prompt from its recorded dense prefill (the engine must be dense now:
    the features read the full weights)."""
    if engine.current_action.target != "none":
        raise RuntimeError("probe features read the dense weights: restore the engine first")
    actions = probed(actions)
    model = engine.model
    values = (dense_statistics(record, input_ids, model) + lens_statistics(record, model)
              + [injected_error(record, engine, a) for a in actions])
    return ProbeFeatures(feature_names(len(decoder_layers(model)), actions), tuple(values))
