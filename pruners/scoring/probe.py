"""What one request's own prefill shows the pruner: its activations, recorded by hooks, and the units
worth keeping for this prompt (Probe Pruning, arXiv 2502.15618, without a separate probe pass).

Why from the prefill: a request runs its prompt through the dense model anyway, so the inputs of every
``down_proj`` / ``o_proj`` and the residual stream entering every layer cost nothing extra to keep; the
per-prompt features (``environments.probe_features``) and the per-prompt channel choice below read them.

``PrefillRecorder`` keeps the first forward it sees (the prefill) and removes its hooks at once, so the
decode steps of the same generation run without hooks. ``ProbeSelection`` keeps, per layer, the same
number of FFN channels (and KV groups) as the engine's plan for the action, but ranks them by this
prompt's fluctuation (x_j - mu_j)^2 ||W_j||^2 blended with the calibration fluctuation (each normalised per
layer), gathers the kept rows / columns into contiguous tensors and swaps them in; the removed units'
calibration mean goes into the output bias, as the engine's compensation does. ``restore`` puts the
original Parameter objects back (bit-exact).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pruners.recovery.compensation import SINK_TOKENS
from pruners.model_info import ModelDims, decoder_layers

FFN_INPUT, HEADS_INPUT = "mlp.down_proj", "self_attn.o_proj"
SELECTABLE = ("ffn_neurons", "attention_heads")     # the targets select_units re-ranks per prompt


@dataclass
class PrefillRecord:
    """One prompt's dense prefill, [tokens, features] per layer (batch 1), on the model's device."""
    inputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)   # (layer, projection) -> input
    residual: list[torch.Tensor] = field(default_factory=list)   # hidden state entering layer i; [-1]: last output
    final: torch.Tensor | None = None                            # the final norm's output (what lm_head reads)

    @property
    def tokens(self) -> int:
        return int(self.residual[0].shape[0])


class PrefillRecorder:
    """``with PrefillRecorder(model) as rec: generate(...)``: ``rec.record`` holds the first forward's
    activations; the hooks go away after that forward, so later decode steps pay nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.record = PrefillRecord()
        self._handles: list = []
        self._done = False

    def __enter__(self) -> "PrefillRecorder":
        layers = decoder_layers(self.model)
        rec = self.record

        def keep_input(key: tuple[int, str]):
            def hook(_module, args):
                if not self._done:
                    rec.inputs[key] = args[0].detach()[0]
            return hook

        def keep_residual(_module, args, kwargs):
            if not self._done:
                rec.residual.append((args[0] if args else kwargs["hidden_states"]).detach()[0])

        def keep_last(_module, _args, output):
            if not self._done:
                rec.residual.append((output[0] if isinstance(output, tuple) else output).detach()[0])

        def keep_final(_module, _args, output):
            if not self._done:
                rec.final = output.detach()[0]

        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(keep_residual, with_kwargs=True))
            for path in (HEADS_INPUT, FFN_INPUT):
                self._handles.append(layer.get_submodule(path).register_forward_pre_hook(keep_input((i, path))))
        self._handles.append(layers[-1].register_forward_hook(keep_last))
        self._handles.append(self.model.model.norm.register_forward_hook(keep_final))
        self._handles.append(self.model.register_forward_hook(lambda *_: self._finish()))
        return self

    def _finish(self) -> None:
        self._done = True
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.remove()


def tail(x: torch.Tensor) -> torch.Tensor:
    """Rows after the sink token(s) (the statistics the engine fits skip them too); float32."""
    return x[SINK_TOKENS:].float() if x.shape[0] > SINK_TOKENS else x.float()


def per_layer_share(scores: torch.Tensor) -> torch.Tensor:
    """[layers, units] scores as shares of their layer's total, so a prompt's and the calibration's
    statistics can be blended whatever their scale."""
    scores = scores.double()
    total = scores.sum(dim=1, keepdim=True)
    return scores / torch.where(total > 0, total, torch.ones_like(total))


def prompt_fluctuation(record: PrefillRecord, model: nn.Module, means: dict[str, torch.Tensor] | None,
                       path: str) -> torch.Tensor:
    """[layers, columns]: this prompt's mean (x_j - mu_j)^2 ||W_:,j||^2 over its tokens after the sink, per
    input column of ``path`` (``mu``: the calibration mean compensation adds back; 0 without compensation),
    in the model's unit order."""
    rows = []
    for i, layer in enumerate(decoder_layers(model)):
        x = tail(record.inputs[i, path])
        if means is not None:
            x = x - means[f"{i}.{path}"].to(x.device, x.dtype)
        w_sq = layer.get_submodule(path).weight.detach().float().pow(2).sum(0)
        rows.append((x.pow(2).mean(0) * w_sq).cpu())
    return torch.stack(rows)


def blend(prompt: torch.Tensor, calibration: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight`` x the prompt's per-layer shares + (1 - weight) x the calibration's (weight 0: the static order)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the probe blend weight must be in [0, 1], got {weight}")
    return weight * per_layer_share(prompt) + (1 - weight) * per_layer_share(calibration)


def top_units(scores: torch.Tensor, kept: Sequence[int]) -> list[torch.Tensor]:
    """Per layer, the indices of its ``kept[i]`` highest-scoring units, in ascending index order (stable on ties:
    the lower index, i.e. the one the static order ranks higher, wins)."""
    out = []
    for row, k in zip(scores, kept):
        order = torch.sort(row, descending=True, stable=True).indices[:k]
        out.append(torch.sort(order).values)
    return out


class _Swap:
    """One nn.Linear's weight (and bias) replaced by gathered copies, and the originals put back."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, feature: str) -> None:
        self.linear, self.feature = linear, feature
        self.original = (linear._parameters["weight"], linear._parameters["bias"], getattr(linear, feature))
        with torch.inference_mode(False), torch.no_grad():
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.size = weight.shape[0 if feature == "out_features" else 1]

    def apply(self) -> None:
        self.linear._parameters["weight"] = self.weight
        self.linear._parameters["bias"] = self.bias
        self.linear.__dict__[self.feature] = self.size

    def reset(self) -> None:
        weight, bias, size = self.original
        self.linear._parameters["weight"] = weight
        self.linear._parameters["bias"] = bias
        self.linear.__dict__[self.feature] = size


@torch.no_grad()
def _output_bias(linear: nn.Linear, mean: torch.Tensor | None, removed: torch.Tensor) -> torch.Tensor | None:
    """The layer's bias plus the removed columns' calibration-mean contribution (None: no bias at all)."""
    original = linear.bias
    if mean is None:
        return None if original is None else original.detach().clone()
    weight = linear.weight.detach()
    extra = (weight.double()[:, removed] @ mean.to(weight.device).double()[removed]).to(weight.dtype)
    return extra if original is None else original.detach() + extra


class ProbeSelection:
    """One request's kept units, gathered: ``apply`` swaps them in, ``restore`` puts the model back exactly.

    ``ffn`` / ``groups``: per layer, the kept FFN channels / KV groups (None: that target untouched);
    ``means``: the calibration means of the projections' inputs (``InputMoments.mean``) for compensation, or None.
    ``gather_s``: the time the copies took (the per-request cost against the generation it serves).
    """

    def __init__(self, model: nn.Module, ffn: Sequence[torch.Tensor] | None = None,
                 groups: Sequence[torch.Tensor] | None = None, means: dict[str, torch.Tensor] | None = None) -> None:
        started = time.perf_counter()
        dims = ModelDims.from_model(model)
        self._swaps: list[_Swap] = []
        for i, layer in enumerate(decoder_layers(model)):
            if ffn is not None:
                self._gather_ffn(layer.mlp, ffn[i], None if means is None else means[f"{i}.{FFN_INPUT}"])
            if groups is not None:
                self._gather_heads(layer.self_attn, groups[i], dims,
                                   None if means is None else means[f"{i}.{HEADS_INPUT}"])
        self.gather_s = time.perf_counter() - started

    def _gather_ffn(self, mlp: nn.Module, keep: torch.Tensor, mean: torch.Tensor | None) -> None:
        device = mlp.gate_proj.weight.device
        keep = keep.to(device)
        removed = _complement(keep, mlp.down_proj.in_features)
        for proj in (mlp.gate_proj, mlp.up_proj):
            self._swaps.append(_Swap(proj, proj.weight.detach()[keep].contiguous(),
                                     None if proj.bias is None else proj.bias.detach()[keep].contiguous(), "out_features"))
        down = mlp.down_proj
        self._swaps.append(_Swap(down, down.weight.detach()[:, keep].contiguous(), _output_bias(down, mean, removed),
                                 "in_features"))

    def _gather_heads(self, attn: nn.Module, keep: torch.Tensor, dims: ModelDims, mean: torch.Tensor | None) -> None:
        device = attn.q_proj.weight.device
        keep = keep.to(device)
        q_cols = (keep[:, None] * dims.group_size * dims.head_dim
                  + torch.arange(dims.group_size * dims.head_dim, device=device)).reshape(-1)
        kv_rows = (keep[:, None] * dims.head_dim + torch.arange(dims.head_dim, device=device)).reshape(-1)
        for proj, rows in ((attn.q_proj, q_cols), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
            self._swaps.append(_Swap(proj, proj.weight.detach()[rows].contiguous(),
                                     None if proj.bias is None else proj.bias.detach()[rows].contiguous(), "out_features"))
        o = attn.o_proj
        removed = _complement(q_cols, o.in_features)
        self._swaps.append(_Swap(o, o.weight.detach()[:, q_cols].contiguous(), _output_bias(o, mean, removed),
                                 "in_features"))

    def apply(self) -> None:
        for swap in self._swaps:
            swap.apply()

    def restore(self) -> None:
        for swap in self._swaps:
            swap.reset()


def _complement(keep: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().squeeze(1)


def group_fluctuation(columns: torch.Tensor, dims: ModelDims) -> torch.Tensor:
    """[layers, o_proj columns] -> [layers, KV groups]: a group's columns summed."""
    return columns.reshape(columns.shape[0], dims.num_kv_heads, -1).sum(-1)


def select_units(engine, record: PrefillRecord, action, weight: float = 0.5,
                 scores: tuple[torch.Tensor, torch.Tensor] | None = None,
                 means: dict[str, torch.Tensor] | None = None) -> ProbeSelection:
    """The units ``engine`` keeps for ``action`` (its per-layer counts), ranked for this prompt.

    ``weight``: the prompt's share in the blend (0: the calibration order alone, which is the engine's own
    prefix). ``scores`` (ffn [layers, channels], kv_groups [layers, groups]) and ``means`` replace the engine's
    calibration statistics (e.g. an in-domain calibration); by default the engine's, in its unit order.
    Heads/FFN actions only; the engine must be dense (the selection reads and gathers the full weights).
    """
    if engine.current_action.target != "none":
        raise RuntimeError("per-prompt selection reads the dense weights: restore the engine first")
    plan, dims, model = engine.plan(action), engine.dims, engine.model
    if means is None and engine.recovery == "compensate":
        means = engine.moments.mean
    ffn_scores, group_scores = scores if scores is not None else (engine.scores.ffn, engine.scores.kv_groups)
    if plan.ffn_kept is not None:
        ranked = blend(prompt_fluctuation(record, model, means, FFN_INPUT), ffn_scores, weight)
        return ProbeSelection(model, ffn=top_units(ranked, plan.ffn_kept), means=means)
    if plan.kv_groups_kept is not None:
        prompt = group_fluctuation(prompt_fluctuation(record, model, means, HEADS_INPUT), dims)
        ranked = blend(prompt, group_scores, weight)
        return ProbeSelection(model, groups=top_units(ranked, plan.kv_groups_kept), means=means)
    raise ValueError(f"per-prompt selection covers FFN channels and KV groups, not {action.label}")
