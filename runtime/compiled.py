"""Static-cache decode, eager or compiled: a preallocated KV cache, and one torch.compile'd step per action.

Why a static cache even eagerly (issue 25): HF's DynamicCache appends each step's K/V with
``torch.cat``, which copies every layer's whole cache every step (at a 512-token prompt about 24 MB
written and read per token on SmolLM2-135M, on top of its 538 MB of weights); a static cache writes
one slot in place. ``StaticCacheDecoder`` is the eager CPU default (runtime.governor).

Why: at batch 1 on a GPU, eager Hugging Face decoding of a 135M-1B model is bound by kernel
launches, not bytes, so slicing heads or channels barely shows (the upstream this project replaces
measured ~0 % from head slicing). With the step compiled and replayed as a CUDA graph
(``mode="reduce-overhead"``) the launches go and the bytes count again. On CPU it stays off by
default: there the step is bound by the matrix-vector kernels, and compiling it measured no gain
(issue 14: 53.3 -> 52.3 ms; not re-measured since).

How: prefill stays eager (its length varies) into the usual DynamicCache, so KV pruning works
unchanged; the kept entries are then copied into a StaticCache whose slots the causal mask indexes
(``cumulative_length``), while ``position_ids`` carry the true positions. Every action has its own
weight shapes (prefix views) and layer list, so the step gets one graph per action: captured lazily
at the action's first step, kept by dynamo's guard cache (its limit raised to hold every action with
``dynamic=False``, so a shape change is a new static graph, never a dynamic one), and selected on
switch by the guards alone. Static caches are shared by actions with the same cache shape and
bucketed length. ``captures`` reports the capture time and graph count per action.

    decoder = CompiledDecoder(model, engine)
    generate(model, ids, 32, engine=engine, decoder=decoder)
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters
from transformers import StaticCache

from runtime.generation import Prefill, Step

log = logging.getLogger(__name__)

GRAPH_LIMIT = 64          # dynamo cache entries per code object: one per action, with room to spare


@dataclass
class Capture:
    """The first step of one action's graph: wall time (compile + first run) and graphs it compiled."""
    seconds: float
    graphs: int


def _decode_step(model: nn.Module, token: torch.Tensor, position_ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    return model(input_ids=token, position_ids=position_ids, past_key_values=cache, use_cache=True).logits[:, -1]


class StaticCacheDecoder:
    """A ``generation.Decoder`` that decodes eagerly over a static KV cache filled from the prefill's.

    ``cache_bucket``: static cache lengths are rounded up to a multiple (attention reads every slot, so
    it bounds the masked slots read per step). ``max_caches``: caches kept per (shape, length), least
    recently used dropped first (None: all; at 2048 slots one cache of SmolLM2-135M holds 94 MB).
    """

    def __init__(self, model: nn.Module, engine=None, cache_bucket: int = 64, max_caches: int | None = 4) -> None:
        self.model, self.engine = model, engine
        self.cache_bucket = cache_bucket
        self.max_caches = max_caches
        self._caches: OrderedDict[tuple, StaticCache] = OrderedDict()

    def _label(self) -> str:
        return self.engine.current_action.label if self.engine is not None else "dense"

    def _static_cache(self, pre: Prefill, new_tokens: int) -> StaticCache:
        """A cache shaped like the prefill's (kept layers x KV heads), long enough, filled with its entries."""
        layers = pre.cache.layers
        length = pre.cache.get_seq_length()
        slots = self.cache_bucket * math.ceil((length + new_tokens) / self.cache_bucket)
        shape = tuple(tuple(layer.keys.shape) for layer in layers)
        key = (shape[0][0], tuple(s[1] for s in shape), shape[0][3], slots, layers[0].keys.dtype)
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = StaticCache(config=self.model.config, max_cache_len=slots)
            if self.max_caches is not None and len(self._caches) > self.max_caches:
                self._caches.popitem(last=False)
        self._caches.move_to_end(key)
        for static, dynamic in zip(cache.layers, layers):
            if static.is_initialized:
                # Slots past the length are masked out, so stale entries need no zeroing; the counter
                # is reset in place because the compiled graph holds its address.
                static.cumulative_length.zero_()
            static.update(dynamic.keys, dynamic.values)
        return cache

    def __call__(self, model: nn.Module, pre: Prefill, new_tokens: int) -> Step:
        cache = self._static_cache(pre, new_tokens)
        device = pre.logits.device

        def step(token: torch.Tensor, position: int) -> torch.Tensor:
            return _decode_step(model, token, torch.tensor([[position]], device=device), cache)
        return step


class CompiledDecoder(StaticCacheDecoder):
    """A ``generation.Decoder`` whose step is compiled per action over a static KV cache.

    ``mode``: torch.compile mode; None picks "reduce-overhead" (CUDA graphs) on CUDA, the default
    elsewhere. ``backend``: "inductor" for real use; tests use "eager" to check the capture and
    switching logic fast. ``cache_bucket``: as in ``StaticCacheDecoder`` (larger: fewer graphs).
    """

    def __init__(self, model: nn.Module, engine=None, mode: str | None = None, backend: str = "inductor",
                 cache_bucket: int = 256) -> None:
        super().__init__(model, engine, cache_bucket, max_caches=None)   # a captured graph keeps its cache's address
        device = next(model.parameters()).device
        self.mode = mode if mode is not None else ("reduce-overhead" if device.type == "cuda" else None)
        # One guard-cache entry per action: dynamo's default limit (8) would silently fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, GRAPH_LIMIT)
        options = {"mode": self.mode} if backend == "inductor" and self.mode else {}
        self._step = torch.compile(_decode_step, backend=backend, dynamic=False, **options)
        self.captures: dict[str, Capture] = {}

    def __call__(self, model: nn.Module, pre: Prefill, new_tokens: int) -> Step:
        cache = self._static_cache(pre, new_tokens)
        label = f"{self._label()}@{cache.layers[0].max_cache_len}"
        device = pre.logits.device

        def step(token: torch.Tensor, position: int) -> torch.Tensor:
            positions = torch.tensor([[position]], device=device)
            if label in self.captures:
                return self._step(model, token, positions, cache).clone()
            graphs, started = counters["stats"]["unique_graphs"], time.perf_counter()
            logits = self._step(model, token, positions, cache).clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.captures[label] = Capture(time.perf_counter() - started, counters["stats"]["unique_graphs"] - graphs)
            log.info("compiled decode step for %s: %.1f s, %d graph(s)", label, self.captures[label].seconds,
                     self.captures[label].graphs)
            return logits
        return step
