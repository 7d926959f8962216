"""Structured, reversible pruning of LLaMA-family models.

Owns everything that scores, removes, compensates or exports units: the action space, the
engine, the targets (``pruners.targets``: one class per unit kind, heads/FFN/layers/KV, owning its plan,
cuts, cost, importance ladder, student view and export shapes), importance criteria (objects the engine
takes; per-unit importances in ``pruners.criteria``), the unit mechanics (slicing, reorder, KV cache), how many units each
layer keeps (allocation), training-free compensation, nested healing of the sub-networks (healing) and a
healed model's sidecar (elastic), layer-by-layer calibration walks, masks, parameter budgets, the baselines'
methods, unstructured references and export.
May import: ``common`` only (and torch/transformers); never ``controller``, ``evaluation``,
``reporting`` or ``modes``.

Public interface (stable): PruningAction, ACTION_SPACE, build_action_space, ActionSpaceConfig,
PruningEngine; plus the helpers the engine is built from (KVCachePruner, PruningPlan,
DecodeCost, ImportanceScores, Criterion, IMPORTANCE, ModelDims, Target, get_target).

The action space is imported eagerly and needs no torch, so reports that only read action
labels stay torch-free; the engine and its helpers load (with torch) on first use.
"""
from __future__ import annotations

import importlib

from pruners.actions import (ACTION_SPACE, NONE, PRUNE_TARGETS, TARGETS, ActionSpaceConfig, PruningAction,
                             build_action_space)

_LAZY = {"DecodeCost": "pruners.cost", "MODES": "pruners.engine", "PruningEngine": "pruners.engine",
         "IMPORTANCE": "pruners.importance", "Criterion": "pruners.importance",
         "ImportanceScores": "pruners.importance", "KV_POLICIES": "pruners.kv_cache",
         "KVCachePruner": "pruners.kv_cache", "ModelDims": "pruners.model_info", "PruningPlan": "pruners.plan",
         "Target": "pruners.targets.base", "get_target": "pruners.targets"}


def __getattr__(name: str) -> object:
    """Import a torch-backed name on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'pruners' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["ACTION_SPACE", "NONE", "PRUNE_TARGETS", "TARGETS", "ActionSpaceConfig", "PruningAction",
           "build_action_space", *_LAZY]
