"""Pruning targets: one class per kind of unit an action removes (KV-cache entries, attention heads by KV
group, FFN channels, whole decoder layers).

Each ``Target`` owns what differs between unit kinds: how an intensity becomes a plan (kept units per
layer), the projections the plan cuts, its decode cost, its ladder of removal steps, its importance scores,
its differentiable student view (healing) and its export shapes. The engine loops over these objects and
never branches on a target's name.

The registry maps a name to its class lazily, so the action space (``pruners.actions``) reads the names
without torch. Adding a target = one module here + one line in ``REGISTRY`` (+ its tests); see
docs/architecture.md.
May import: ``common`` and the rest of ``pruners``.
"""
from __future__ import annotations

import functools
import importlib

# name -> "module:class"; the order is the action space's (index 0 is "none", then these in turn)
REGISTRY = {
    "kv_cache": "pruners.targets.kv_cache:KVCacheTarget",
    "attention_heads": "pruners.targets.heads:HeadsTarget",
    "ffn_neurons": "pruners.targets.ffn:FFNTarget",
    "transformer_layers": "pruners.targets.layers:LayersTarget",
}
PRUNE_TARGETS = tuple(REGISTRY)


@functools.cache
def get_target(name: str):
    """The target object registered as ``name`` (imported on first use); "none" (the dense action) is the
    base ``Target``, which removes nothing."""
    if name == "none":
        from pruners.targets.base import Target
        return Target()
    try:
        module, _, cls = REGISTRY[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown pruning target '{name}': choose from {', '.join(PRUNE_TARGETS)}") from None
    return getattr(importlib.import_module(module), cls)()


def all_targets() -> list:
    """Every registered target object, in registry order."""
    return [get_target(name) for name in PRUNE_TARGETS]
