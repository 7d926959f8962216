"""Structured, reversible pruning of LLaMA-family models.

Owns the action space, the engine (reversible prefix views) and its plans and costs; sub-packages own the
rest: ``targets`` (one class per unit kind, heads/FFN/layers/KV, owning its plan, cuts, cost, importance
ladder, student view and export shapes), ``units`` (slicing, reorder, KV-cache pruning, masks),
``scoring`` (importance criteria as objects, the calibration pass, the per-prompt probe), ``recovery``
(compensation, nested healing, elastic sidecars), ``methods`` (the static methods and references the
controller is compared against) and ``export`` (Hugging Face folder, GGUF).
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
         "IMPORTANCE": "pruners.scoring.importance", "Criterion": "pruners.scoring.importance",
         "ImportanceScores": "pruners.scoring.importance", "KV_POLICIES": "pruners.units.kv_cache",
         "KVCachePruner": "pruners.units.kv_cache", "ModelDims": "pruners.model_info", "PruningPlan": "pruners.plan",
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
