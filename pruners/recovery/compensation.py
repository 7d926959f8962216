"""Training-free compensation: what an action removes is partly added back, from calibration statistics.

Two closed forms, both fitted once per action and applied as reversible swaps:

- **Bias (FLAP)** for FFN channels and attention heads. A removed input column j of ``down_proj`` /
  ``o_proj`` contributed ``W[:, j] * x_j``; its mean over the calibration tokens, ``W[:, removed] @
  mean(x[removed])``, becomes an output bias of that projection. The error left is only the removed
  units' fluctuation around their mean. One vector (hidden size) per cut layer per action.
- **Linear replacement (ReplaceMe / LLM-Streamline)** for dropped layers. Each run of consecutive
  dropped layers is replaced by one affine map of the hidden state, ``h -> h + h A + b``, fitted by
  ridge least squares so that it carries the pruned model's own hidden state at the run's start
  (earlier runs already replaced) to the dense model's hidden state after the run. The map is applied
  after the kept layer before the run (``ReplacedRun``), so the layer count, KV-cache indices and
  everything else of the layer action are unchanged. One (hidden x hidden) matrix plus bias per run.

Both are stored once per action (the maps in the engine's disk cache) and swapped in and out with the
action; restore puts the original Parameter objects and layer list back, so it stays bit-exact.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pruners.scoring.calibration_pass import calibration_pass
from pruners.methods.layerwise import LayerInputs, first_layer_inputs, hidden_of, run_layer
from pruners.model_info import decoder_layers

log = logging.getLogger(__name__)

RECOVERIES = ("none", "compensate")
BIAS_INPUTS = ("self_attn.o_proj", "mlp.down_proj")   # the projections whose removed input columns get a bias
RIDGE = 1e-4   # ridge strength as a share of the mean diagonal of X^T X (chosen on calibration data: bench/recovery.py)
# Statistics skip each sequence's first token: it carries the attention sink's massive activation (hidden
# norm ~24000 against ~230 in SmolLM2's layer 20), which would dominate every mean and least-squares fit.
SINK_TOKENS = 1


def check_recovery(recovery: str) -> str:
    if recovery not in RECOVERIES:
        raise ValueError(f"unknown recovery '{recovery}': choose from {', '.join(RECOVERIES)}")
    return recovery


# ------------------------------------------------------------------ bias compensation

@dataclass
class InputMoments:
    """Calibration moments of every layer's ``o_proj`` / ``down_proj`` input and residual stream.

    Over the tokens after each sequence's ``SINK_TOKENS``, in the model's current unit order (the
    engine's reordered dense model), float64 on the CPU. They feed the compensation biases (means) and
    the global allocation of KV groups (``pruners.targets.heads.HeadsTarget.damage``).
    """
    mean: dict[str, torch.Tensor]        # "<layer>.<path>" -> E[x]
    square: dict[str, torch.Tensor]      # "<layer>.<path>" -> E[x^2]
    residual: torch.Tensor               # [layers]: E[||h||^2] of the hidden state entering each layer
    cosine: torch.Tensor                 # [layers + 1]^2: E[cos(h_i, h_j)], h_i entering layer i (h_L: the output)
    tokens: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "square": self.square, "residual": self.residual, "cosine": self.cosine,
                "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict) -> "InputMoments":
        return cls(**data)

    def permuted(self, columns: dict[str, torch.Tensor]) -> "InputMoments":
        """The moments after the units were reordered: ``columns["<layer>.<path>"]`` = new column -> old column.
        The residual stream and its cosines do not depend on the unit order."""
        def take(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v[columns[k].to(v.device)] if k in columns else v for k, v in stats.items()}
        return InputMoments(take(self.mean), take(self.square), self.residual, self.cosine, self.tokens)


class TailSums:
    """Sums of x and x^2 of every ``BIAS_INPUTS`` projection's input, over the tokens after each text's
    ``SINK_TOKENS``: the means compensation adds back and the variances fluctuation importance ranks by
    (``pruners.scoring.importance``). A ``calibration_pass`` collector; ``MomentCollector`` holds one, so a joint
    pass sums them once."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.keys: list[str] = []

    def attach(self, layers: Sequence[nn.Module]) -> list:
        self.keys = [f"{i}.{path}" for i in range(len(layers)) for path in BIAS_INPUTS]

        def hook(key: str):
            def add(_module, args):
                x = tail_tokens(args[0])
                accumulate(self.sums, f"{key}.sum", x.sum(0))
                accumulate(self.sums, f"{key}.sq", x.pow(2).sum(0))
            return add
        return [layer.get_submodule(path).register_forward_pre_hook(hook(f"{i}.{path}"))
                for i, layer in enumerate(layers) for path in BIAS_INPUTS]

    def start(self) -> None:
        pass

    def finish(self, ids: torch.Tensor) -> None:
        self.tokens += ids[:, SINK_TOKENS:].numel()

    def mean(self) -> dict[str, torch.Tensor]:
        return {k: self.sums[f"{k}.sum"] / self.tokens for k in self.keys}

    def square(self) -> dict[str, torch.Tensor]:
        return {k: self.sums[f"{k}.sq"] / self.tokens for k in self.keys}

    def variance(self, key: str) -> torch.Tensor:
        mean = self.sums[f"{key}.sum"] / self.tokens
        return (self.sums[f"{key}.sq"] / self.tokens - mean.pow(2)).clamp_min(0).float()


def accumulate(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value.cpu() if key in sums else value.cpu()


def tail_tokens(x: torch.Tensor) -> torch.Tensor:
    """[tokens, features] float64: a [batch, seq, features] activation without each text's sink token(s)."""
    return x.detach()[:, SINK_TOKENS:].reshape(-1, x.shape[-1]).double()


class MomentCollector:
    """The sums behind ``InputMoments`` (its ``TailSums`` plus the residual stream's energy and cosines), after
    each text's ``SINK_TOKENS``: a ``calibration_pass`` collector."""

    def __init__(self) -> None:
        self.tails = TailSums()
        self.sums: dict[str, torch.Tensor] = {}
        self.layers = 0
        self._states: list[torch.Tensor] = []    # the current text's residual stream, layer by layer

    def attach(self, layers: Sequence[nn.Module]) -> list:
        self.layers = len(layers)
        handles = self.tails.attach(layers)

        def residual(i: int):
            def hook(_module, args, kwargs):
                h = tail_tokens(args[0] if args else kwargs["hidden_states"])
                accumulate(self.sums, f"{i}.residual", h.pow(2).sum())
                self._states.append(h)
            return hook

        def final(_module, _args, output):
            self._states.append(tail_tokens(output[0] if isinstance(output, tuple) else output))

        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(residual(i), with_kwargs=True))
        handles.append(layers[-1].register_forward_hook(final))
        return handles

    def start(self) -> None:
        self._states.clear()

    def finish(self, ids: torch.Tensor) -> None:
        unit = torch.nn.functional.normalize(torch.stack(self._states), dim=-1)    # [layers + 1, tokens, hidden]
        accumulate(self.sums, "cosine", torch.einsum("itd,jtd->ij", unit, unit))
        self.tails.finish(ids)
        self._states.clear()

    def moments(self) -> InputMoments:
        tokens = self.tails.tokens
        return InputMoments(mean=self.tails.mean(), square=self.tails.square(),
                            residual=torch.stack([self.sums[f"{i}.residual"] for i in range(self.layers)]) / tokens,
                            cosine=self.sums["cosine"] / tokens, tokens=tokens)


def input_moments(model: nn.Module, calibration_ids: Sequence[torch.Tensor]) -> InputMoments:
    """One calibration pass with hooks; only sums are kept."""
    collector = MomentCollector()
    calibration_pass(model, calibration_ids, [collector], desc="compensation moments")
    return collector.moments()


def removed_mean_bias(weight: torch.Tensor, mean: torch.Tensor, keep: int) -> torch.Tensor:
    """``W[:, keep:] @ mean[keep:]``: the removed input columns' mean contribution to the output."""
    return (weight.detach().double()[:, keep:] @ mean.to(weight.device)[keep:]).to(weight.dtype)


class BiasSwap:
    """An output bias put on one nn.Linear while an action is applied, and the original put back."""

    def __init__(self, linear: nn.Linear, extra: torch.Tensor) -> None:
        self.linear = linear
        self.original = linear._parameters["bias"]
        with torch.inference_mode(False), torch.no_grad():
            value = extra if self.original is None else self.original.detach() + extra
            self.compensated = nn.Parameter(value.clone(), requires_grad=False)

    def apply(self) -> None:
        self.linear._parameters["bias"] = self.compensated

    def reset(self) -> None:
        self.linear._parameters["bias"] = self.original


# ------------------------------------------------------------------ linear replacement of dropped layers

def layer_runs(layers_kept: Sequence[int], n_layers: int) -> list[tuple[int, int]]:
    """Maximal runs of consecutive dropped layers as (first, last) indices."""
    kept = set(layers_kept)
    runs: list[tuple[int, int]] = []
    for i in range(n_layers):
        if i in kept:
            continue
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def ridge_affine_map(gram: torch.Tensor, cross: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) minimising ||[X 1] [A; b] - D||^2 + lam ||A||^2, from gram = [X 1]^T [X 1], cross = [X 1]^T D.

    lam = ``ridge`` x mean diagonal of X^T X (scale-free); the bias is not penalised. float64.
    """
    hidden = gram.shape[0] - 1
    lam = ridge * gram.diagonal()[:hidden].mean()
    penalty = torch.zeros_like(gram)
    penalty.diagonal()[:hidden] = lam
    theta = torch.linalg.solve(gram + penalty, cross)
    return theta[:hidden], theta[hidden]


def _affine_stats(x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([X 1]^T [X 1], [X 1]^T D) of token rows, float64."""
    x = x.reshape(-1, x.shape[-1]).double()
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    xa = torch.cat([x, ones], dim=1)
    return xa.T @ xa, xa.T @ delta.reshape(-1, delta.shape[-1]).double()


class ReplacedRun(nn.Module):
    """A kept decoder layer followed by the affine map that stands in for the dropped run after it."""

    def __init__(self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        like = next(layer.parameters())
        hidden = weight.shape[0]
        with torch.inference_mode(False), torch.no_grad():
            # h + h A + b == F.linear(h, (I + A)^T, b): one matmul
            self.map = nn.Linear(hidden, hidden, bias=True, device=like.device, dtype=like.dtype)
            self.map.weight.copy_((torch.eye(hidden, dtype=torch.float64) + weight.double()).T)
            self.map.bias.copy_(bias)
            self.map.requires_grad_(False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (self.map(out[0]), *out[1:])
        return self.map(out)


@dataclass
class _Pending:
    first: int                       # first dropped layer of the run
    last: int
    inputs: list[torch.Tensor]       # the pruned model's hidden states entering the run, per prompt


@torch.no_grad()
def fit_replacements(model: nn.Module, plans: dict[str, Sequence[int]], calibration_ids: Sequence[torch.Tensor],
                     ridge: float = RIDGE, progress: bool = True) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """For every plan (name -> kept layer indices): run first layer -> (A, b) of its replacement map.

    One walk through the layers serves all plans: a dense stream of hidden states, and one pruned
    stream per plan in which each dropped run is already replaced by its fitted map (so later maps
    see the inputs they will really get). Everything stays on the model's device, one prompt at a time.
    """
    layers = decoder_layers(model)
    inputs: LayerInputs = first_layer_inputs(model, calibration_ids)
    dense = [hidden_of(args, kwargs) for args, kwargs in inputs]
    streams = {name: list(dense) for name in plans}
    runs = {name: {first: last for first, last in layer_runs(kept, len(layers))} for name, kept in plans.items()}
    pending: dict[str, _Pending] = {}
    maps: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {name: {} for name in plans}
    for i in tqdm(range(len(layers)), desc="fit layer replacements", unit="layer", disable=not progress):
        for name in plans:
            if i in runs[name]:
                pending[name] = _Pending(i, runs[name][i], streams[name])
        dense = [run_layer(layers[i], h, inputs[p]) for p, h in enumerate(dense)]
        for name, kept in plans.items():
            job = pending.get(name)
            if job is None:
                streams[name] = [run_layer(layers[i], h, inputs[p]) for p, h in enumerate(streams[name])]
            elif job.last == i:
                gram, cross = None, None
                for x, target in zip(job.inputs, dense):
                    g, c = _affine_stats(x[:, SINK_TOKENS:], (target - x)[:, SINK_TOKENS:])
                    gram, cross = (g, c) if gram is None else (gram + g, cross + c)
                weight, bias = ridge_affine_map(gram, cross, ridge)
                maps[name][job.first] = (weight.float().cpu(), bias.float().cpu())
                dtype = job.inputs[0].dtype
                streams[name] = [(x.double() + x.double() @ weight + bias).to(dtype) for x in job.inputs]
                del pending[name]
    return maps
