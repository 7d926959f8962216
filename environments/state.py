"""The RL state: hardware telemetry vector + prompt-feature vector (+ the prompt's prefill-probe features with
``--state-features ...+probe``, + each action's KL on a short dense look-ahead with ``...+lookahead``), with
ablation masks.

Shared by training, testing and the policy router in evaluation so all three see the same state.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.config import uses_lookahead, uses_probe
from pruners import NONE
from machine.load_signals import BASIC, LoadAwareHardware, SlowdownTracker, hardware_feature_names

ABLATIONS = ("none", "no_hardware", "no_prompt")


@dataclass
class Observation:
    state: np.ndarray
    hardware: object          # telemetry.HardwareState
    features: object          # nlp_analyzer.PromptFeatures
    controller_s: float       # time to read telemetry and analyse the prompt


def lookahead_labels(labels: Sequence[str]) -> list[str]:
    """The actions whose look-ahead KL a "...+lookahead" state reads: every one but the dense model, in order."""
    return [label for label in labels if label != NONE.label]


def state_feature_names(kind: str = BASIC, probe: Sequence[str] = (), actions: Sequence[str] = ()) -> list[str]:
    """Hardware slots (``kind``: basic telemetry, or + the contention signals) then prompt features, then with
    ``kind`` "...+probe" the probe features ``probe`` (their names depend on the model's depth and the action
    space: ``environments.probe_features.state_names``), then with "...+lookahead" one look-ahead KL per pruning
    action of the run's action labels ``actions``."""
    from nlp_analyzer import PromptFeatures
    if uses_probe(kind) and not probe:
        raise ValueError(f"state features '{kind}' need the probe features' names")
    if uses_lookahead(kind) and not lookahead_labels(actions):
        raise ValueError(f"state features '{kind}' need the run's pruning actions")
    return ([f"hw.{n}" for n in hardware_feature_names(kind)] + [f"prompt.{n}" for n in PromptFeatures.FEATURE_NAMES]
            + ([f"probe.{n}" for n in probe] if uses_probe(kind) else [])
            + ([f"lookahead.{a}" for a in lookahead_labels(actions)] if uses_lookahead(kind) else []))


class StateBuilder:
    """With a SlowdownTracker the hardware part is a LoadAwareHardware (the contention state)."""

    def __init__(self, analyzer, sampler, tokenizer=None, ablation: str = "none",
                 slowdown: SlowdownTracker | None = None):
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation '{ablation}': choose from {', '.join(ABLATIONS)}")
        self.analyzer, self.sampler, self.tokenizer, self.ablation = analyzer, sampler, tokenizer, ablation
        self.slowdown = slowdown

    def build(self, text: str, hardware=None) -> Observation:
        """`hardware` replays a recorded HardwareState instead of reading the sampler."""
        started = time.perf_counter()
        hw = hardware if hardware is not None else self.sampler.latest()
        if hardware is None and self.slowdown is not None:
            hw = LoadAwareHardware(hw, self.slowdown.value)
        features = self.analyzer.analyze(text, tokenizer=self.tokenizer)
        return Observation(state_vector(hw, features, self.ablation), hw, features, time.perf_counter() - started)


def state_vector(hardware, features, ablation: str = "none", probe: Sequence[float] = (),
                 lookahead: Sequence[float] = ()) -> np.ndarray:
    """Hardware then prompt features (then the probe features, then the look-ahead KLs), with the ablated part
    zeroed (no_prompt: the syntax, the probe and the look-ahead features, everything the prompt decides).

    Test mode rebuilds an ablation policy's state from the main policy's observation with this, so
    both decide on the very same telemetry reading and prompt.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation '{ablation}': choose from {', '.join(ABLATIONS)}")
    hw_vec = np.asarray(hardware.vector, dtype=np.float64)
    pf_vec = np.concatenate([np.asarray(part, dtype=np.float64) for part in (features.vector, probe, lookahead)])
    if ablation == "no_hardware":
        hw_vec = np.zeros_like(hw_vec)
    elif ablation == "no_prompt":
        pf_vec = np.zeros_like(pf_vec)
    return np.concatenate([hw_vec, pf_vec])
