"""A lean batch-1 decode step for Llama-family models: one token through the model in a few tensor ops per layer.

Why (issue 25): on SmolLM2-135M at 2 threads the int8 decode step over HF's forward (``StaticCacheDecoder``)
took 26.7 ms, of which the matvec kernel was ~8 ms; fp32 43.7 ms, of which ~22 ms. The rest was framework
work per step: HF module calls, the causal mask and RoPE rebuilt for every token, ~2000 small aten ops. At
batch 1 none of it is needed: one query attends to every cached slot (no mask), and the rotation of one
position is the same for every layer.

How: ``LeanDecoder`` is a ``runtime.generation.Decoder``. Per generation (an action cannot change inside
one; between generations the engine narrows weights and swaps layer lists, so nothing is kept across them)
it reads the model as it runs now: the layer list (a ``ReplacedRun`` is its layer followed by its affine
map), every Linear's product for its current weight view (the decode kernel bound to it where the Linear
has one, ``bound_matvec``: KernelLinear fp32, ShadowLinear int8; else the module's ``forward``), with its
bias where it has one (FLAP compensation adds o_proj/down_proj biases), head counts from the projections'
shapes, the norms' weights; it copies the prefill's (possibly KV-pruned)
cache into its own per-layer K/V buffers and takes cos/sin from the model's ``rotary_emb`` for the
generation's positions. A step is then: the embedding row; per layer RMSNorm, q/k/v, RoPE as one
[head_dim, head_dim] rotation per step (the attention scale folded into the query's), the new key and
value written into the next slot, grouped-query attention over the filled slots (two bmm, no copies of
K/V per query head), o_proj, residual, RMSNorm, gate/up/act/down, residual; the final norm and the
lm_head for the one position.

Where it cannot run the model exactly (``unsupported``: a configuration it was not tested on, hooks or
a patched ``forward`` on any module, CUDA, weights not in float32, ...) it runs ``StaticCacheDecoder``
instead and logs why, once per reason: never different numbers silently.

    decoder = LeanDecoder(model, engine)
    generate(model, ids, 32, engine=engine, decoder=decoder)
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel,
                                                      LlamaRMSNorm, LlamaRotaryEmbedding)

from pruners.recovery.compensation import ReplacedRun
from runtime.compiled import StaticCacheDecoder
from runtime.generation import Prefill, Step

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama",)                 # configurations the tests run the lean step on
ROPE_TYPES = ("default", "llama3")       # inv_freq fixed per model (dynamic / longrope depend on the length)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs")

Linear = Callable[[torch.Tensor], torch.Tensor]


def _parts(layer: nn.Module) -> tuple[nn.Module, nn.Linear | None]:
    """(decoder layer, affine map run after it or None) of one entry of ``model.model.layers``."""
    return (layer.layer, layer.map) if type(layer) is ReplacedRun else (layer, None)


def run_layers(model: nn.Module) -> list[nn.Module]:
    """The layers one forward runs now (LlamaModel iterates the first ``num_hidden_layers``)."""
    return list(model.model.layers[: model.config.num_hidden_layers])


def _structure(model: nn.Module) -> str | None:
    """Why the modules are not the Llama stock classes the lean step re-implements (None: they are)."""
    base = model.model
    expected = ((base, LlamaModel), (base.norm, LlamaRMSNorm), (base.rotary_emb, LlamaRotaryEmbedding),
                (base.embed_tokens, nn.Embedding))
    for m, cls in expected:
        if type(m) is not cls:
            return f"{type(m).__name__} where the lean step expects {cls.__name__}"
    if base.embed_tokens.max_norm is not None:
        return "an embedding with max_norm"
    if not isinstance(model.lm_head, nn.Linear):
        return f"an lm_head of type {type(model.lm_head).__name__}"
    scaling = None
    for i, entry in enumerate(run_layers(model)):
        layer, out_map = _parts(entry)
        parts = ((layer, LlamaDecoderLayer), (layer.self_attn, LlamaAttention), (layer.mlp, LlamaMLP),
                 (layer.input_layernorm, LlamaRMSNorm), (layer.post_attention_layernorm, LlamaRMSNorm))
        for m, cls in parts:
            if type(m) is not cls:
                return f"layer {i} has a {type(m).__name__} where the lean step expects {cls.__name__}"
        attn = layer.self_attn
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                   layer.mlp.down_proj) + ((out_map,) if out_map is not None else ())
        if not all(isinstance(m, nn.Linear) for m in linears):
            return f"layer {i} has a projection that is not an nn.Linear"
        q_heads, kv_heads = (attn.q_proj.weight.shape[0] // attn.head_dim, attn.k_proj.weight.shape[0] // attn.head_dim)
        if kv_heads == 0 or q_heads % kv_heads:
            return f"layer {i} has {q_heads} query heads for {kv_heads} KV heads"
        if scaling is not None and attn.scaling != scaling:
            return "layers with different attention scales"
        scaling = attn.scaling
    return None


def _hooks(model: nn.Module) -> str | None:
    """Why a module call would do more than its ``forward`` (hooks, a patched forward), or None."""
    if any(getattr(torch_module, name) for name in _GLOBAL_HOOKS):
        return "global forward hooks are registered"
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"forward hooks on {name or 'the model'}"
        if "forward" in m.__dict__:
            return f"a patched forward on {name or 'the model'}"
    return None


def unsupported(model: nn.Module, engine=None) -> str | None:
    """Why the lean step cannot run ``model`` as it is now exactly as HF's forward does (None: it can)."""
    config = model.config
    if getattr(engine, "mode", None) == "mask":
        return "the engine prunes with hooks (mask mode)"
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} (the lean step runs {', '.join(MODEL_TYPES)})"
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type} (the lean step is for the CPU)"
    if weight.dtype != torch.float32:
        return f"weights loaded in {weight.dtype} (the lean step computes in float32; --dtype sets int8/bf16 weights)"
    rope = getattr(model.model.rotary_emb, "rope_type", None)
    if rope not in ROPE_TYPES:
        return f"RoPE type {rope!r} (the lean step runs {', '.join(ROPE_TYPES)})"
    layer_types = getattr(config, "layer_types", None) or ()
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return "sliding-window attention"
    if model.training and config.attention_dropout > 0:
        return "attention dropout in training mode"
    return _structure(model) or _hooks(model)


def _norm(norm: LlamaRMSNorm) -> Linear:
    """HF's RMSNorm of one hidden vector, its scale computed as a Python float (F.rms_norm is ~10 aten ops)."""
    weight, eps, size = norm.weight, norm.variance_epsilon, norm.weight.shape[0]

    def run(h: torch.Tensor) -> torch.Tensor:
        return torch.mul(h, (float(torch.dot(h, h)) / size + eps) ** -0.5).mul_(weight)
    return run


def _product(linear: nn.Linear) -> Linear:
    """x [in] -> linear(x) [out] for the weight view the Linear holds now: its kernel bound to that view where it
    has one (``bound_matvec``), else its ``forward``."""
    bound = getattr(linear, "bound_matvec", None)
    matvec = bound() if bound is not None else None
    if matvec is None:
        return linear.forward
    bias = linear.bias
    return matvec if bias is None else lambda x: matvec(x).add_(bias)


def _rotation_basis(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, S): ``x @ (I * cos + S * sin)`` is HF's ``x * cos + rotate_half(x) * sin`` for a row x of one head.

    rotate_half(x)_j = -x_{j+h} for j < h and x_{j-h} for j >= h (h = head_dim / 2), so S_{j+h, j} = -1 and
    S_{j-h, j} = 1."""
    half = head_dim // 2
    eye = torch.eye(head_dim)
    signed = torch.zeros(head_dim, head_dim)
    j = torch.arange(half)
    signed[j + half, j] = -1.0
    signed[j, j + half] = 1.0
    return eye, signed


@dataclass
class _Layer:
    """One run layer as this generation reads it: norms, Linear products, heads and its K/V buffers."""
    in_norm: Linear
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: Linear
    gate: Linear
    up: Linear
    down: Linear
    act: Linear
    out_map: Linear | None
    kv_heads: int
    group: int              # query heads per KV head
    keys: torch.Tensor      # [kv_heads, slots, head_dim]
    values: torch.Tensor


def _layer(entry: nn.Module, pre: Prefill, slots: int) -> _Layer:
    layer, out_map = _parts(entry)
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    kv_heads = attn.k_proj.weight.shape[0] // head_dim
    cached = pre.cache.layers[attn.layer_idx]
    length = cached.keys.shape[2]
    if cached.keys.shape[1] != kv_heads:
        raise ValueError(f"the prefill cached {cached.keys.shape[1]} KV heads where k_proj has {kv_heads}: "
                         "prefill with the action that decodes")
    keys = cached.keys.new_empty(kv_heads, slots, head_dim)
    values = cached.values.new_empty(kv_heads, slots, head_dim)
    keys[:, :length] = cached.keys[0]
    values[:, :length] = cached.values[0]
    return _Layer(_norm(layer.input_layernorm), _product(attn.q_proj), _product(attn.k_proj), _product(attn.v_proj),
                  _product(attn.o_proj), _norm(layer.post_attention_layernorm), _product(mlp.gate_proj),
                  _product(mlp.up_proj), _product(mlp.down_proj), mlp.act_fn.forward,
                  None if out_map is None else _product(out_map),
                  kv_heads, attn.q_proj.weight.shape[0] // head_dim // kv_heads, keys, values)


class LeanDecoder:
    """A ``generation.Decoder`` that runs a Llama-family model's decode step directly, or ``StaticCacheDecoder``
    where it cannot do so exactly (``unsupported``; logged once per reason)."""

    def __init__(self, model: nn.Module, engine=None) -> None:
        self.engine = engine
        self.fallback = StaticCacheDecoder(model, engine)
        self._said: set[str] = set()

    def _falls_back(self, model: nn.Module) -> bool:
        reason = unsupported(model, self.engine)
        if reason is not None and reason not in self._said:
            self._said.add(reason)
            log.info("lean decode: %s; decoding with StaticCacheDecoder", reason)
        return reason is not None

    @torch.inference_mode()
    def __call__(self, model: nn.Module, pre: Prefill, new_tokens: int) -> Step:
        if self._falls_back(model):
            return self.fallback(model, pre, new_tokens)
        return _LeanStep(model, pre, new_tokens)


class _LeanStep:
    """The step of one generation (the module docstring says what it reads and when)."""

    def __init__(self, model: nn.Module, pre: Prefill, new_tokens: int) -> None:
        base = model.model
        self.filled = pre.cache.get_seq_length()
        self.slots = self.filled + new_tokens
        self.layers = [_layer(entry, pre, self.slots) for entry in run_layers(model)]
        attn = _parts(run_layers(model)[0])[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.eye, self.signed = _rotation_basis(self.head_dim)
        self.embedding, self.rotary = base.embed_tokens.weight, base.rotary_emb
        self.final_norm, self.head = _norm(base.norm), _product(model.lm_head)
        self.new_tokens = new_tokens
        self.first: int | None = None       # the first step's position: cos/sin are indexed from it
        self.cos = self.sin = torch.empty(0)

    def _rotation(self, position: int) -> torch.Tensor:
        """RoPE of ``position`` as one [head_dim, head_dim] matrix (cos/sin of every position of the generation
        are taken from the model's rotary embedding at its first step)."""
        if self.first is None:
            self.first = position
            positions = torch.arange(position, position + self.new_tokens)[None]
            self.cos, self.sin = (t[0] for t in self.rotary(self.embedding[:1], positions))
        index = position - self.first
        if not 0 <= index < self.new_tokens:
            raise ValueError(f"position {position}: this step decodes positions {self.first} to "
                             f"{self.first + self.new_tokens - 1}, one after another")
        return torch.addcmul(self.eye * self.cos[index], self.signed, self.sin[index])

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        slot = self.filled
        if slot >= self.slots:
            raise ValueError(f"this step was made for {self.new_tokens} new tokens: make a new one per generation")
        rotation = self._rotation(position)
        q_rotation = rotation * self.scaling
        head_dim, n = self.head_dim, slot + 1
        h = self.embedding[int(token)]          # one hidden vector [hidden] throughout
        for layer in self.layers:
            x = layer.in_norm(h)
            q = torch.mm(layer.q(x).view(-1, head_dim), q_rotation).view(layer.kv_heads, layer.group, head_dim)
            torch.mm(layer.k(x).view(layer.kv_heads, head_dim), rotation, out=layer.keys[:, slot])
            layer.values[:, slot] = layer.v(x).view(layer.kv_heads, head_dim)
            scores = torch.bmm(q, layer.keys[:, :n].transpose(1, 2)).softmax(dim=-1)
            attended = torch.bmm(scores, layer.values[:, :n]).view(-1)
            h = h + layer.o(attended)
            x = layer.post_norm(h)
            h += layer.down(layer.act(layer.gate(x)).mul_(layer.up(x)))
            if layer.out_map is not None:
                h = layer.out_map(h)
        self.filled = n
        return self.head(self.final_norm(h))[None]
