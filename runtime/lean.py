"""A lean batch-1 decode step for Llama-family models: one token through the model in one kernel call, or a few tensor
ops per layer.

Why (issue 25): on SmolLM2-135M at 2 threads the int8 decode step over HF's forward (``StaticCacheDecoder``)
took 26.7 ms, of which the matvec kernel was ~8 ms; fp32 43.7 ms, of which ~22 ms. The rest was framework
work per step: HF module calls, the causal mask and RoPE rebuilt for every token, ~2000 small aten ops. At
batch 1 none of it is needed: one query attends to every cached slot (no mask), and the rotation of one
position is the same for every layer. The torch-op loop over layers that replaced it still made ~600 torch
calls and 211 kernel calls per step (fp32 40-44 ms against 30-31 ms in one call; int8 23-24 against 13-15,
``bench/lean_decode.py``), hence the one-call step.

How: ``LeanDecoder`` is a ``runtime.generation.Decoder``. Per generation (an action cannot change inside
one; between generations the engine narrows weights and swaps layer lists, so nothing is kept across them)
it reads the model as it runs now: the layer list (a ``ReplacedRun`` is its layer followed by its affine
map), every Linear's product for its current weight view (the decode kernel's ``Product`` bound to it, bias
included, where the model has the kernel: ``kernel_product`` of KernelLinear fp32 and ShadowLinear int8; else
the module's ``forward``), head counts from the projections' shapes, the norms; it copies the prefill's
(possibly KV-pruned) cache into its own per-layer K/V buffers and takes cos/sin from the model's
``rotary_emb`` for the generation's positions. A step is then: the embedding row; per layer RMSNorm,
q/k/v, RoPE, the new key and value written into the next slot, grouped-query attention over the filled
slots, o_proj, residual, RMSNorm, gate/up/act/down, residual; the final norm and the lm_head for the one
position. Where every product is on the kernel and the activation is SiLU, the kernel's ``LeanStep``
(``lean_step.cpp``) runs all of it in one call; else ``_LeanStep._layers`` runs it in torch ops (RoPE as one
[head_dim, head_dim] rotation, attention as two bmm). The tests hold both to HF's forward and the one-call
step to the loop.

Where it cannot run the model exactly (``unsupported``: a configuration it was not tested on, hooks or
a patched ``forward`` on any module, CUDA, weights not in float32, ...) it runs ``StaticCacheDecoder``
instead and logs why, once per reason: never different numbers silently.

    decoder = LeanDecoder(model, engine)
    generate(model, ids, 32, engine=engine, decoder=decoder)
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel,
                                                      LlamaRMSNorm, LlamaRotaryEmbedding)

from pruners.recovery.compensation import ReplacedRun
from runtime.compiled import StaticCacheDecoder
from runtime.dtype import model_kernel
from runtime.generation import Prefill, Step

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama",)                 # configurations the tests run the lean step on
ROPE_TYPES = ("default", "llama3")       # inv_freq fixed per model (dynamic / longrope depend on the length)
SILU = (nn.SiLU, SiLUActivation)         # the activations the kernel's one-call step computes
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
    config = getattr(model, "config", None)
    if getattr(engine, "mode", None) == "mask":
        return "the engine prunes with hooks (mask mode)"
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"model type {model_type!r} (the lean step runs {', '.join(MODEL_TYPES)})"
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


def _rms(norm: LlamaRMSNorm, h: torch.Tensor) -> torch.Tensor:
    """HF's RMSNorm of one hidden vector, its scale computed as a Python float (F.rms_norm is ~10 aten ops)."""
    return torch.mul(h, (float(torch.dot(h, h)) / h.shape[0] + norm.variance_epsilon) ** -0.5).mul_(norm.weight)


def _product(linear: nn.Linear, kernel) -> Linear:
    """x [in] -> linear(x) [out] for the weight view the Linear holds now: the decode kernel's product bound to that
    view, bias included, where it has one (``kernel_product``; a plain fp32 Linear, such as the affine map the engine
    made for a replaced run after the kernel was set, gets one from ``kernel``), else its ``forward``."""
    make = getattr(linear, "kernel_product", None)
    product = make() if make is not None else None
    if product is None and kernel is not None and type(linear) is nn.Linear and linear.weight.dtype == torch.float32:
        product = kernel.Product(linear.weight, bias=linear.bias)
    return linear.forward if product is None else product


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
    in_norm: LlamaRMSNorm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: LlamaRMSNorm
    gate: Linear
    up: Linear
    down: Linear
    act: nn.Module
    out_map: Linear | None
    kv_heads: int
    group: int              # query heads per KV head
    keys: torch.Tensor      # [kv_heads, slots, head_dim]
    values: torch.Tensor

    def products(self) -> list[Linear]:
        maps = [] if self.out_map is None else [self.out_map]
        return [self.q, self.k, self.v, self.o, self.gate, self.up, self.down] + maps


def _layer(entry: nn.Module, pre: Prefill, slots: int, kernel) -> _Layer:
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
    product = functools.partial(_product, kernel=kernel)
    return _Layer(layer.input_layernorm, product(attn.q_proj), product(attn.k_proj), product(attn.v_proj),
                  product(attn.o_proj), layer.post_attention_layernorm, product(mlp.gate_proj),
                  product(mlp.up_proj), product(mlp.down_proj), mlp.act_fn,
                  None if out_map is None else product(out_map),
                  kv_heads, attn.q_proj.weight.shape[0] // head_dim // kv_heads, keys, values)


def _native_step(kernel, layers: list[_Layer], base: nn.Module, head: Linear, head_dim: int, scaling: float):
    """The kernel's one-call step (lean_step.cpp) over these layers, or None where it cannot run them: a product not
    on the kernel (bfloat16, ``--matvec torch``) or an activation other than SiLU."""
    products = [head] + [p for layer in layers for p in layer.products()]
    if kernel is None or not all(isinstance(p, kernel.Product) for p in products) \
            or not all(type(layer.act) in SILU for layer in layers):
        return None
    step = kernel.LeanStep(base.embed_tokens.weight, base.norm.weight, base.norm.variance_epsilon, head, head_dim,
                           scaling)
    for layer in layers:
        step.add_layer(layer.in_norm.weight, layer.in_norm.variance_epsilon, layer.q, layer.k, layer.v, layer.o,
                       layer.post_norm.weight, layer.post_norm.variance_epsilon, layer.gate, layer.up, layer.down,
                       layer.out_map, layer.keys, layer.values)
    return step


class LeanDecoder:
    """A ``generation.Decoder`` that runs a Llama-family model's decode step directly, or ``StaticCacheDecoder``
    where it cannot do so exactly (``unsupported``; logged once per reason). ``one_call=False`` runs the torch-op
    loop even where the kernel's one-call step could run (bench/lean_decode.py times the two)."""

    def __init__(self, model: nn.Module, engine=None, one_call: bool = True) -> None:
        self.engine, self.one_call = engine, one_call
        self.fallback = StaticCacheDecoder(model, engine)
        self._said: set[str] = set()

    def falls_back(self, model: nn.Module) -> bool:
        reason = unsupported(model, self.engine)
        if reason is not None and reason not in self._said:
            self._said.add(reason)
            log.info("lean decode: %s; decoding with StaticCacheDecoder", reason)
        return reason is not None

    @torch.inference_mode()
    def __call__(self, model: nn.Module, pre: Prefill, new_tokens: int) -> Step:
        if self.falls_back(model):
            return self.fallback(model, pre, new_tokens)
        return _LeanStep(model, pre, new_tokens, self.one_call)


class _LeanStep:
    """The step of one generation (the module docstring says what it reads and when): the kernel's one-call step where
    every product is on the kernel (``_native_step``), else this module's loop over the layers."""

    def __init__(self, model: nn.Module, pre: Prefill, new_tokens: int, one_call: bool = True) -> None:
        base = model.model
        self.filled = pre.cache.get_seq_length()
        self.slots = self.filled + new_tokens
        kernel = model_kernel(model)
        self.layers = [_layer(entry, pre, self.slots, kernel) for entry in run_layers(model)]
        attn = _parts(run_layers(model)[0])[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.eye, self.signed = _rotation_basis(self.head_dim)
        self.embedding, self.rotary, self.final_norm = base.embed_tokens.weight, base.rotary_emb, base.norm
        self.head = _product(model.lm_head, kernel)
        self.native = _native_step(kernel, self.layers, base, self.head, self.head_dim, self.scaling) \
            if one_call else None
        self.new_tokens = new_tokens
        self.first: int | None = None       # the first step's position: cos/sin are indexed from it
        self.cos = self.sin = torch.empty(0)

    def _cos_sin(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin of ``position`` [head_dim] (those of every position of the generation are taken from the
        model's rotary embedding at its first step)."""
        if self.first is None:
            self.first = position
            positions = torch.arange(position, position + self.new_tokens)[None]
            self.cos, self.sin = (t[0] for t in self.rotary(self.embedding[:1], positions))
        index = position - self.first
        if not 0 <= index < self.new_tokens:
            raise ValueError(f"position {position}: this step decodes positions {self.first} to "
                             f"{self.first + self.new_tokens - 1}, one after another")
        return self.cos[index], self.sin[index]

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        slot = self.filled
        if slot >= self.slots:
            raise ValueError(f"this step was made for {self.new_tokens} new tokens: make a new one per generation")
        cos, sin = self._cos_sin(position)
        logits = self.native(int(token), cos, sin, slot) if self.native is not None else self._layers(token, cos, sin)
        self.filled = slot + 1
        return logits

    def _layers(self, token: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The step in torch ops: RoPE as one [head_dim, head_dim] rotation (the attention scale folded into the
        query's), two bmm for grouped-query attention (no copies of K/V per query head)."""
        slot, head_dim = self.filled, self.head_dim
        rotation = torch.addcmul(self.eye * cos, self.signed, sin)
        q_rotation, n = rotation * self.scaling, slot + 1
        h = self.embedding[int(token)]          # one hidden vector [hidden] throughout
        for layer in self.layers:
            x = _rms(layer.in_norm, h)
            q = torch.mm(layer.q(x).view(-1, head_dim), q_rotation).view(layer.kv_heads, layer.group, head_dim)
            torch.mm(layer.k(x).view(layer.kv_heads, head_dim), rotation, out=layer.keys[:, slot])
            layer.values[:, slot] = layer.v(x).view(layer.kv_heads, head_dim)
            scores = torch.bmm(q, layer.keys[:, :n].transpose(1, 2)).softmax(dim=-1)
            attended = torch.bmm(scores, layer.values[:, :n]).view(-1)
            h = h + layer.o(attended)
            x = _rms(layer.post_norm, h)
            h += layer.down(layer.act(layer.gate(x)).mul_(layer.up(x)))
            if layer.out_map is not None:
                h = layer.out_map(h)
        return self.head(_rms(self.final_norm, h))[None]
