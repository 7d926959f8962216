"""Unstructured and N:M sparsity references: magnitude, Wanda and SparseGPT.

QUALITY ONLY, NO SPEEDUP ON DENSE KERNELS: zeroed weights are still stored and multiplied, so
these rows show how much quality a given share of zeros costs, not what a structured model
gains (2:4 needs sparse tensor-core kernels, which this project does not use).

- ``magnitude``: zero the smallest |W| of each matrix (N:M: of each group of M inputs).
- ``wanda`` (Sun et al. 2023): score |W_ij| * ||X_j||_2, zero the lowest per output row.
- ``sparsegpt`` (Frantar & Alistarh 2023): per matrix, choose the mask by w^2 / [H^-1]_jj^2 over
  column blocks (adaptive unstructured masks; N:M inside each group) and update the remaining
  weights with the OBS correction, H = X^T X + 0.01 * mean(diag) * I, blocks of 128 columns.

Only the seven projections of each decoder layer are sparsified (the embedding and lm_head stay
dense, as in both papers). The data-driven methods go layer by layer: layer i's input
statistics are collected with layers 0..i-1 already sparsified, as in the reference code.
``sparsified`` restores every weight bit-exactly afterwards.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pruners.methods.layerwise import LayerInputs, first_layer_inputs, next_layer_inputs
from pruners.model_info import decoder_layers

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
# The projections that read the same input share its statistics.
INPUT_GROUPS = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
PROJECTIONS = tuple(p for group in INPUT_GROUPS.values() for p in group)


@dataclass(frozen=True)
class Sparsity:
    """``fraction`` of weights zeroed (unstructured), or keep ``n`` of every ``m`` consecutive inputs."""
    fraction: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m:
            if not 0 < self.n < self.m:
                raise ValueError(f"N:M sparsity needs 0 < N < M, got {self.n}:{self.m}")
            object.__setattr__(self, "fraction", (self.m - self.n) / self.m)
        elif not 0.0 < self.fraction < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.fraction}")

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.fraction:g}"

    @classmethod
    def parse(cls, text: str) -> "Sparsity":
        """'0.5' (unstructured) or '2:4' (N:M)."""
        text = text.strip()
        try:
            if ":" in text:
                n, m = text.split(":")
                return cls(n=int(n), m=int(m))
            return cls(fraction=float(text))
        except ValueError as err:
            raise ValueError(f"sparsity '{text}': use a fraction like 0.5 or N:M like 2:4 ({err})") from None


@dataclass(frozen=True)
class SparsityReport:
    zeros: int    # weights zeroed in the decoder projections
    total: int    # weights in the decoder projections


# ------------------------------------------------------------------ masks from scores

def prune_mask(scores: torch.Tensor, sparsity: Sparsity, per_row: bool) -> torch.Tensor:
    """Boolean mask of the weights to zero (lowest scores), per row or per matrix, or N:M per row."""
    rows, cols = scores.shape
    if sparsity.m:
        if cols % sparsity.m:
            raise ValueError(f"{sparsity.label} sparsity needs input width divisible by {sparsity.m}, got {cols}")
        groups = scores.reshape(rows, cols // sparsity.m, sparsity.m)
        lowest = groups.topk(sparsity.m - sparsity.n, dim=-1, largest=False).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True).reshape(rows, cols)
    if per_row:
        k = int(cols * sparsity.fraction)
        lowest = scores.topk(k, dim=1, largest=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)
    k = int(scores.numel() * sparsity.fraction)
    lowest = scores.reshape(-1).topk(k, largest=False).indices
    return torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).scatter_(0, lowest, True).reshape(rows, cols)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: Sparsity, block_size: int = 128,
                    damping: float = 0.01) -> torch.Tensor:
    """SparseGPT: the pruned weight (float32) with the OBS update of the kept weights.

    ``hessian`` is X^T X over the calibration inputs of this matrix ([in, in]).
    """
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    cols = w.shape[1]
    if sparsity.m and (cols % sparsity.m or block_size % sparsity.m):
        raise ValueError(f"{sparsity.label} sparsity needs the input width ({cols}) and the block size "
                         f"({block_size}) to be multiples of {sparsity.m}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * torch.mean(torch.diag(h)) * torch.eye(cols, device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    for b1 in range(0, cols, block_size):
        b2 = min(b1 + block_size, cols)
        w1, h1 = w[:, b1:b2].clone(), h_inv[b1:b2, b1:b2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        if sparsity.m:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:   # adaptive mask: the block's lowest w^2 / [H^-1]_jj^2
            mask1 = prune_mask(w1 ** 2 / torch.diag(h1)[None] ** 2, sparsity, per_row=False)
        for i in range(b2 - b1):
            if sparsity.m and i % sparsity.m == 0:
                group = w1[:, i:i + sparsity.m] ** 2 / torch.diag(h1)[None, i:i + sparsity.m] ** 2
                mask1[:, i:i + sparsity.m] = prune_mask(group, sparsity, per_row=True)
            col, d = w1[:, i], h1[i, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err[:, None] * h1[i, i:][None]
            err1[:, i] = err
        w[:, b1:b2] = q1
        w[:, b2:] -= err1 @ h_inv[b1:b2, b2:]
    return w


# ------------------------------------------------------------------ calibration statistics

@torch.no_grad()
def layer_input_stats(layer: nn.Module, inputs: LayerInputs, full: bool) -> dict[str, torch.Tensor]:
    """Per input group of ``layer``: X^T X ([in, in], ``full``) or its diagonal ([in])."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def add(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            value = x.T @ x if full else x.pow(2).sum(0)
            stats[name] = stats[name] + value if name in stats else value
        return add

    handles = [layer.get_submodule(name).register_forward_pre_hook(hook(name)) for name in INPUT_GROUPS]
    try:
        for args, kwargs in inputs:
            layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


# ------------------------------------------------------------------ applying

@torch.no_grad()
def _sparsify_layer(layer: nn.Module, method: str, sparsity: Sparsity, stats: dict[str, torch.Tensor]) -> None:
    for source, paths in INPUT_GROUPS.items():
        for path in paths:
            weight = layer.get_submodule(path).weight
            if method == "sparsegpt":
                new = sparsegpt_prune(weight, stats[source], sparsity)
            else:
                scores = weight.detach().float().abs()
                if method == "wanda":
                    scores = scores * stats[source].sqrt()[None]
                new = weight.detach().float().masked_fill(prune_mask(scores, sparsity, per_row=method == "wanda"), 0.0)
            weight.copy_(new.to(weight.dtype))


def sparsify(model: nn.Module, method: str, sparsity: Sparsity,
             calibration_ids: Sequence[torch.Tensor] | None = None, progress: bool = True) -> SparsityReport:
    """Zero weights of every decoder projection in place (see ``sparsified`` for the reversible form)."""
    if method not in METHODS:
        raise ValueError(f"unknown unstructured method '{method}': choose from {', '.join(METHODS)}")
    needs_data = method != "magnitude"
    if needs_data and not calibration_ids:
        raise ValueError(f"{method} needs calibration prompts")
    layers = decoder_layers(model)
    inputs = first_layer_inputs(model, calibration_ids) if needs_data else []
    for i in tqdm(range(len(layers)), desc=f"{method} {sparsity.label}", unit="layer", disable=not progress):
        stats = layer_input_stats(layers[i], inputs, full=method == "sparsegpt") if needs_data else {}
        _sparsify_layer(layers[i], method, sparsity, stats)
        if needs_data and i + 1 < len(layers):
            inputs = next_layer_inputs(layers[i], inputs)   # from the pruned layer, as in SparseGPT
    weights = [layer.get_submodule(p).weight for layer in layers for p in PROJECTIONS]
    return SparsityReport(zeros=sum(int((w == 0).sum()) for w in weights), total=sum(w.numel() for w in weights))


@contextlib.contextmanager
def sparsified(model: nn.Module, method: str, sparsity: Sparsity,
               calibration_ids: Sequence[torch.Tensor] | None = None,
               progress: bool = True) -> Iterator[SparsityReport]:
    """``with sparsified(model, "wanda", Sparsity(n=2, m=4), ids) as report: ...`` then the exact
    dense weights again (a copy of the projections is held meanwhile), even when the body raises.
    Apply it to the dense model: not while a structural engine action is applied."""
    weights = [layer.get_submodule(p).weight for layer in decoder_layers(model) for p in PROJECTIONS]
    saved = [w.detach().clone() for w in weights]
    try:
        yield sparsify(model, method, sparsity, calibration_ids, progress)
    finally:
        with torch.no_grad():
            for weight, original in zip(weights, saved):
                weight.copy_(original)
