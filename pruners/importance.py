"""Importance criteria the engine takes: scores that order KV groups, FFN channels and layers
(higher = keep longer).

As in Torch-Pruning, a criterion is an object passed into the pruner, not a subclass of it:
``PruningEngine(model, importance="taylor")`` looks the name up in ``IMPORTANCE``, and any
``Criterion`` (a name, whether it reads calibration text, and a scoring function) can be passed
instead. The engine tokenises the calibration prompts and caches the scores on disk by name.

Criteria:
- ``magnitude`` (data-free): FFN channel j = ||gate_j||*||up_j||*||down_:,j||; KV group g =
  ||v_g||_F * ||o_:,g||_F (q/k only re-weight, v and o carry the signal). Layers: a weak
  data-free proxy, the norm bound of how far each block can move the residual stream,
  ||W_o|| ||W_v diag(g_in)|| + ||W_down|| ||W_up diag(g_post)||.
- ``activation`` (Wanda-style): unit score = sum over its weights of |W_ij| * ||X_j||, where X is
  the input of down_proj (FFN) / o_proj (heads) on calibration text; layers by Block Influence.
- ``fluctuation`` (FLAP): unit score = Var(X_j) * ||W_:,j||^2 (what is left after bias
  compensation removes the unit's mean contribution); layers by Block Influence.
- ``block_influence`` (ShortGPT): layers by BI = 1 - mean cos(layer input, layer output) on
  calibration text; heads and FFN by magnitude.
- ``taylor`` (LLM-Pruner): first-order |W * dL/dW| summed per unit (``pruners.taylor``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruners.calibration_pass import calibration_pass
from pruners.compensation import TailSums
from pruners.model_info import ModelDims, decoder_layers
from pruners.score_cache import ImportanceScores
from pruners.taylor import compute_taylor_scores

log = logging.getLogger(__name__)

def _norms(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return weight.float().norm(dim=dim)


def _group_sum(values: torch.Tensor, n_groups: int) -> torch.Tensor:
    return values.reshape(n_groups, -1).sum(dim=1)


@torch.no_grad()
def magnitude_scores(model: nn.Module, dims: ModelDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ffn [L, I], kv_groups [L, G], layers [L]) from weights alone."""
    ffn, groups, layer_scores = [], [], []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        ffn.append(_norms(mlp.gate_proj.weight, 1) * _norms(mlp.up_proj.weight, 1) * _norms(mlp.down_proj.weight, 0))
        v_sq = _group_sum(_norms(attn.v_proj.weight, 1) ** 2, dims.num_kv_heads)
        o_sq = _group_sum(_norms(attn.o_proj.weight, 0) ** 2, dims.num_kv_heads)
        groups.append((v_sq * o_sq).sqrt())
        g_in = layer.input_layernorm.weight.float()
        g_post = layer.post_attention_layernorm.weight.float()
        attn_bound = attn.o_proj.weight.float().norm() * (attn.v_proj.weight.float() * g_in).norm()
        mlp_bound = mlp.down_proj.weight.float().norm() * (mlp.up_proj.weight.float() * g_post).norm()
        layer_scores.append(attn_bound + mlp_bound)
    return torch.stack(ffn).cpu(), torch.stack(groups).cpu(), torch.stack(layer_scores).cpu()


@dataclass
class _Activations:
    down_sq: list[torch.Tensor]   # per layer: sum over tokens of x^2 for down_proj inputs
    o_sq: list[torch.Tensor]      # same for o_proj inputs
    cos_sum: torch.Tensor         # per layer: sum over tokens of cos(input, output)
    tokens: int


class ActivationCollector:
    """Sums of x^2 (every token) of every down_proj / o_proj input and each layer's cos(input, output) (Block
    Influence): a ``calibration_pass`` collector. The sums after the sink token(s), which fluctuation
    importance reads, are ``compensation.TailSums``."""

    def __init__(self, model: nn.Module) -> None:
        layers = decoder_layers(model)

        def zeros(width: int) -> torch.Tensor:
            return torch.zeros(width, dtype=torch.float64)
        self.acts = _Activations(down_sq=[zeros(ly.mlp.down_proj.in_features) for ly in layers],
                                 o_sq=[zeros(ly.self_attn.o_proj.in_features) for ly in layers],
                                 cos_sum=zeros(len(layers)), tokens=0)
        self._inputs: dict[int, torch.Tensor] = {}

    @staticmethod
    def _add_sq(store: list[torch.Tensor], i: int, x: torch.Tensor) -> None:
        x = x.detach().double()
        store[i] += x.pow(2).reshape(-1, x.shape[-1]).sum(0).cpu()

    def attach(self, layers: Sequence[nn.Module]) -> list:
        acts, handles = self.acts, []
        for i, layer in enumerate(layers):
            def pre(_m, args, kwargs, i=i):
                self._inputs[i] = args[0] if args else kwargs["hidden_states"]

            def post(_m, _args, _kwargs, output, i=i):
                out = output[0] if isinstance(output, tuple) else output
                cos = F.cosine_similarity(self._inputs.pop(i).float(), out.float(), dim=-1)
                acts.cos_sum[i] += cos.double().sum().cpu()

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda _m, a, i=i: self._add_sq(acts.down_sq, i, a[0])))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda _m, a, i=i: self._add_sq(acts.o_sq, i, a[0])))
        return handles

    def start(self) -> None:
        pass

    def finish(self, ids: torch.Tensor) -> None:
        self.acts.tokens += ids.numel()


def collect_activations(model: nn.Module, calibration_ids: Sequence[torch.Tensor]) -> tuple[_Activations, TailSums]:
    """One pass over the calibration prompts with hooks; nothing but sums is kept."""
    collector, tails = ActivationCollector(model), TailSums()
    calibration_pass(model, calibration_ids, [collector, tails], desc="importance statistics")
    return collector.acts, tails


def wanda_scores(model: nn.Module, dims: ModelDims, acts: _Activations) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured Wanda: sum_i |W_ij| * ||X_j|| over each unit's input columns."""
    ffn, groups = [], []
    for i, layer in enumerate(decoder_layers(model)):
        down_abs = layer.mlp.down_proj.weight.detach().float().abs().sum(0).cpu()
        ffn.append(down_abs * acts.down_sq[i].sqrt().float())
        o_abs = layer.self_attn.o_proj.weight.detach().float().abs().sum(0).cpu()
        groups.append(_group_sum(o_abs * acts.o_sq[i].sqrt().float(), dims.num_kv_heads))
    return torch.stack(ffn), torch.stack(groups)


def fluctuation_scores(model: nn.Module, dims: ModelDims, tails: TailSums) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP: Var(X_j) * ||W_:,j||^2 per input column of down_proj / o_proj (summed per KV group).

    What a unit's removal leaves once its mean is compensated (``pruners.compensation``) is its
    fluctuation times its weights, so this is the criterion that matches ``--recovery compensate``.
    """
    ffn, groups = [], []
    for i, layer in enumerate(decoder_layers(model)):
        down_sq = layer.mlp.down_proj.weight.detach().float().pow(2).sum(0).cpu()
        ffn.append(tails.variance(f"{i}.mlp.down_proj") * down_sq)
        o_sq = layer.self_attn.o_proj.weight.detach().float().pow(2).sum(0).cpu()
        groups.append(_group_sum(tails.variance(f"{i}.self_attn.o_proj") * o_sq, dims.num_kv_heads))
    return torch.stack(ffn), torch.stack(groups)


def tokenize_calibration(texts: Sequence[str], tokenizer, max_tokens: int) -> list[torch.Tensor]:
    ids = [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_tokens).input_ids for t in texts]
    ids = [x for x in ids if x.numel() > 1]
    if not ids:
        raise ValueError("calibration prompts tokenised to nothing")
    return ids


def magnitude_importance(model: nn.Module, _calibration_ids: Sequence[torch.Tensor] | None = None) -> ImportanceScores:
    """Data-free: every unit and layer by its weight norms."""
    ffn, groups, layer_scores = magnitude_scores(model, ModelDims.from_model(model))
    return ImportanceScores("magnitude", ffn, groups, layer_scores, "magnitude")


def _block_influence(acts: _Activations) -> torch.Tensor:
    return (1.0 - acts.cos_sum / acts.tokens).float()


@torch.no_grad()
def activation_scores(model: nn.Module, acts: _Activations, _tails: TailSums) -> ImportanceScores:
    """Wanda-style units, Block Influence layers."""
    ffn, groups = wanda_scores(model, ModelDims.from_model(model), acts)
    return ImportanceScores("activation", ffn, groups, _block_influence(acts), "block_influence")


@torch.no_grad()
def fluctuation_activation_scores(model: nn.Module, acts: _Activations, tails: TailSums) -> ImportanceScores:
    """FLAP-style fluctuation units, Block Influence layers."""
    ffn, groups = fluctuation_scores(model, ModelDims.from_model(model), tails)
    return ImportanceScores("fluctuation", ffn, groups, _block_influence(acts), "block_influence")


@torch.no_grad()
def block_influence_scores(model: nn.Module, acts: _Activations, _tails: TailSums) -> ImportanceScores:
    """ShortGPT: Block Influence layers; units by magnitude."""
    ffn, groups, _ = magnitude_scores(model, ModelDims.from_model(model))
    return ImportanceScores("block_influence", ffn, groups, _block_influence(acts), "block_influence")


@dataclass(frozen=True)
class Criterion:
    """An importance criterion as the engine takes it; ``name`` keys the score cache.

    A criterion that reads only the calibration activations (``from_activations``: the ``ActivationCollector``
    sums and the ``compensation.TailSums``) can share its calibration pass with the compensation moments
    (the engine then runs one pass for both, and the tail sums once)."""
    name: str
    needs_calibration: bool    # scores read calibration prompts (the engine tokenises them)
    score: Callable[[nn.Module, Sequence[torch.Tensor] | None], ImportanceScores] | None = None
    from_activations: Callable[[nn.Module, _Activations, TailSums], ImportanceScores] | None = None

    def __call__(self, model: nn.Module, calibration_ids: Sequence[torch.Tensor] | None) -> ImportanceScores:
        if self.from_activations is None:
            return self.score(model, calibration_ids)
        if not calibration_ids:
            raise ValueError(f"importance '{self.name}' needs calibration prompts")
        acts, tails = collect_activations(model, calibration_ids)
        log.info("importance %s from %d calibration tokens", self.name, acts.tokens)
        return self.from_activations(model, acts, tails)


IMPORTANCE: dict[str, Criterion] = {c.name: c for c in (
    Criterion("magnitude", False, magnitude_importance),
    Criterion("activation", True, from_activations=activation_scores),
    Criterion("fluctuation", True, from_activations=fluctuation_activation_scores),
    Criterion("block_influence", True, from_activations=block_influence_scores),
    Criterion("taylor", True, compute_taylor_scores),
)}


def get_importance(importance: str | Criterion) -> Criterion:
    """A registered criterion by name, or the criterion object given."""
    if isinstance(importance, Criterion):
        return importance
    try:
        return IMPORTANCE[importance]
    except KeyError:
        raise ValueError(f"unknown importance criterion '{importance}': choose from {', '.join(IMPORTANCE)}") from None
