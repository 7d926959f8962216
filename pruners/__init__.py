"""Structured, reversible pruning of LLaMA-family models.

Public interface (stable): PruningAction, ACTION_SPACE, build_action_space, ActionSpaceConfig,
PruningEngine; plus the helpers the engine is built from (KVCachePruner, PruningPlan,
DecodeCost, ImportanceScores, ModelDims).
"""
from pruners.actions import (ACTION_SPACE, NONE, PRUNE_TARGETS, SEED_ACTIONS, TARGETS, ActionSpaceConfig,
                             PruningAction, build_action_space)
from pruners.cost import DecodeCost
from pruners.engine import MODES, PruningEngine
from pruners.importance import CRITERIA, ImportanceScores
from pruners.kv_cache import KV_POLICIES, KVCachePruner
from pruners.model_info import ModelDims
from pruners.plan import PruningPlan

__all__ = ["ACTION_SPACE", "NONE", "PRUNE_TARGETS", "SEED_ACTIONS", "TARGETS", "ActionSpaceConfig",
           "PruningAction", "build_action_space", "CRITERIA", "DecodeCost", "ImportanceScores", "KV_POLICIES",
           "KVCachePruner", "MODES", "ModelDims", "PruningEngine", "PruningPlan"]
