"""Structured, reversible pruning of LLaMA-family models.

Public interface (stable): PruningAction, ACTION_SPACE, build_action_space, ActionSpaceConfig,
PruningEngine.
"""
from pruners.actions import (ACTION_SPACE, NONE, PRUNE_TARGETS, SEED_ACTIONS, TARGETS, ActionSpaceConfig,
                             PruningAction, build_action_space)

__all__ = ["ACTION_SPACE", "NONE", "PRUNE_TARGETS", "SEED_ACTIONS", "TARGETS", "ActionSpaceConfig",
           "PruningAction", "build_action_space"]
