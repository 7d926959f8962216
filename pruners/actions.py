"""The discrete action space: what the DQN's output index i means.

Built from a config (targets x intensities) so it can be stored in checkpoints and compared.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from pruners.targets import PRUNE_TARGETS, REGISTRY

TARGETS = ("none", *PRUNE_TARGETS)


@dataclass(frozen=True)
class PruningAction:
    target: str          # "none" or a registered target (pruners.targets.REGISTRY)
    intensity: float     # fraction of the target removed, 0..1

    def __post_init__(self) -> None:
        if self.target != "none" and self.target not in REGISTRY:
            raise ValueError(f"unknown pruning target '{self.target}': choose from none, {', '.join(REGISTRY)}")
        if self.target == "none":
            if self.intensity != 0.0:
                raise ValueError("the 'none' action has intensity 0")
        elif not 0.0 < self.intensity < 1.0:
            raise ValueError(f"intensity of {self.target} must be in (0, 1), got {self.intensity}")

    @property
    def label(self) -> str:
        return "none" if self.target == "none" else f"{self.target}:{self.intensity:g}"

    @classmethod
    def parse(cls, text: str) -> "PruningAction":
        """'ffn_neurons:0.5' -> PruningAction('ffn_neurons', 0.5); 'none' -> the dense action."""
        text = text.strip()
        if text in ("none", "dense"):
            return NONE
        target, sep, value = text.partition(":")
        if not sep:
            raise ValueError(f"action '{text}' must look like TARGET:INTENSITY, e.g. ffn_neurons:0.5")
        try:
            intensity = float(value)
        except ValueError as err:
            raise ValueError(f"action '{text}': intensity '{value}' is not a number") from err
        return cls(target, intensity)


NONE = PruningAction("none", 0.0)


@dataclass(frozen=True)
class ActionSpaceConfig:
    targets: tuple[str, ...] = PRUNE_TARGETS
    intensities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)

    def to_dict(self) -> dict:
        return asdict(self)


def build_action_space(config: ActionSpaceConfig = ActionSpaceConfig()) -> list[PruningAction]:
    """[none] + targets x intensities, de-duplicated, index 0 is always 'none'."""
    actions = [NONE] + [PruningAction(target, float(intensity))
                        for target in config.targets for intensity in config.intensities]
    return list(dict.fromkeys(actions))

ACTION_SPACE: list[PruningAction] = build_action_space()
