"""Policy checkpoints: atomic writes, safe loads, and refusal of mismatched runs.

Everything is stored as tensors and plain Python values so ``torch.load(weights_only=True)``
can read it: a corrupt or foreign file fails with a clear message, never executes code.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_write_bytes

FORMAT = "adaptive-pruning-policy"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or belongs to a different setting; the message says which."""


def _to_storable(obj):
    """numpy arrays -> tensors, recursively, so the safe loader accepts them."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {k: _to_storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_storable(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **_to_storable(payload)}
    atomic_write_bytes(Path(path), lambda fh: torch.save(payload, fh), mode=0o600)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: train one with `--mode train --checkpoint {path}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, TypeError, KeyError, IndexError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({err.__class__.__name__}); "
                              "retrain, or pass the previous good checkpoint") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a policy checkpoint of this tool (no '{FORMAT}' header)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {payload.get('format_version')}, "
                              f"this code reads {FORMAT_VERSION}: retrain with this version")
    return payload


def check_compatible(payload: dict, *, model_id: str, action_space: list[str], state_features: list[str]) -> None:
    """Refuse a checkpoint trained for another model, action space or state-feature spec."""
    problems = []
    if payload.get("model_id") != model_id:
        problems.append(f"model: checkpoint {payload.get('model_id')!r}, now {model_id!r} (pass --model {payload.get('model_id')})")
    ckpt_actions = list(payload.get("action_space", []))
    if ckpt_actions != list(action_space):
        missing = sorted(set(ckpt_actions) - set(action_space))
        extra = sorted(set(action_space) - set(ckpt_actions))
        problems.append(f"action space: {len(ckpt_actions)} actions in checkpoint vs {len(action_space)} now"
                        + (f"; only in checkpoint: {missing}" if missing else "")
                        + (f"; only now: {extra}" if extra else "")
                        + ("; same actions in another order" if not missing and not extra else ""))
    ckpt_features = list(payload.get("state_features", []))
    if ckpt_features != list(state_features):
        diff = sorted(set(ckpt_features) ^ set(state_features))
        problems.append(f"state features: {len(ckpt_features)} in checkpoint vs {len(state_features)} now"
                        + (f"; differing: {diff[:6]}" if diff else "; different order"))
    if problems:
        raise CheckpointError("checkpoint does not match this run — " + "; ".join(problems))
