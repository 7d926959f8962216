"""What an evaluation scores: the dense model, one static pruning action, or the learned policy.

Why one abstraction: the WikiText loop and the lm-eval wrapper both need the same per-request
cycle for the policy (observe, decide, apply, score, restore, record) and nothing per request
for dense or static models, so both ask a `Route` instead of knowing which kind they hold.

Spec strings (``--eval-models``): ``dense``, ``static:TARGET:INTENSITY`` (``static:ffn_neurons:0.5``),
``static:all`` (every pruning action of the run's action space) and ``policy:CHECKPOINT``, comma-separated.
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

from pruners import NONE, PruningAction

class EvaluationError(RuntimeError):
    """An evaluation input is unusable; the message names the flag that fixes it."""


class Router(Protocol):
    """The policy as evaluation sees it: observes telemetry + the prompt, returns its greedy action."""

    def choose(self, text: str) -> PruningAction: ...


class Engine(Protocol):
    """The part of `pruners.PruningEngine` evaluation uses."""

    kv_pruner: object   # the current action's KV-cache pruner (None unless a kv_cache action is applied)

    def pruned(self, action: PruningAction) -> AbstractContextManager: ...


RouterFactory = Callable[[str, object], Router]   # (checkpoint, LoadedModel) -> Router, e.g. policy.load_router


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ``--eval-models``."""
    kind: str                              # dense | static | policy
    action: PruningAction = NONE           # static only
    checkpoint: str | None = None          # policy only

    @property
    def label(self) -> str:
        if self.kind == "static":
            return f"static:{self.action.label}"
        if self.kind == "policy":
            return f"policy:{self.checkpoint}"
        return "dense"

    @property
    def needs_engine(self) -> bool:
        return self.kind != "dense"

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        text = text.strip()
        kind, _, rest = text.partition(":")
        if kind == "dense" and not rest:
            return cls("dense")
        if kind == "static" and rest:
            try:
                return cls("static", action=PruningAction.parse(rest))
            except ValueError as err:
                raise EvaluationError(f"--eval-models entry '{text}': {err}") from err
        if kind == "policy" and rest:
            return cls("policy", checkpoint=rest)
        raise EvaluationError(
            f"--eval-models entry '{text}' not understood: use dense, static:TARGET:INTENSITY "
            "(e.g. static:ffn_neurons:0.5), static:all or policy:CHECKPOINT")


def expand_static_all(specs: str, actions: Sequence[PruningAction]) -> str:
    """'static:all' -> one static entry per pruning action (the thesis table: dense vs every static vs policy)."""
    items = [item.strip() for item in specs.split(",") if item.strip()]
    expanded: list[str] = []
    for item in items:
        expanded += [f"static:{a.label}" for a in actions if a != NONE] if item == "static:all" else [item]
    return ",".join(expanded)


def parse_specs(specs: str | Sequence[str]) -> list[ModelSpec]:
    """'dense,static:ffn_neurons:0.5' or a list of entries -> specs, duplicates rejected."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    parsed = [ModelSpec.parse(item) for item in items if item.strip()]
    if not parsed:
        raise EvaluationError("--eval-models is empty: give at least one of dense, static:ACTION, policy:CHECKPOINT")
    labels = [spec.label for spec in parsed]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise EvaluationError(f"--eval-models lists {', '.join(duplicates)} more than once")
    return parsed


class Route:
    """Dense: nothing to apply. Subclasses set the whole-run scope (`activate`) or, with
    `per_request`, a `request(text)` scope that every request must be scored in, one at a time."""

    per_request = False   # True: every request must go through `request()` one at a time

    def __init__(self, spec: ModelSpec, engine: Engine | None = None) -> None:
        self.spec = spec
        self.engine = engine      # generation asks it for the current kv_cache hook
        self.actions: Counter[str] = Counter()
        self.controller_s = 0.0   # time spent deciding (telemetry + prompt features + Q-network)
        self.model_s = 0.0        # time spent scoring inside `request()`

    @property
    def label(self) -> str:
        return self.spec.label

    def activate(self) -> AbstractContextManager:
        """Scope of the whole evaluation of this model."""
        return nullcontext()

    @property
    def decisions(self) -> int:
        return sum(self.actions.values())


class StaticRoute(Route):
    """One action for the whole run: applied once, restored at the end, even on error."""

    def activate(self) -> AbstractContextManager:
        return self.engine.pruned(self.spec.action)


class PolicyRoute(Route):
    """Per request: the router observes and decides, the engine applies, the caller scores, the engine restores."""

    per_request = True

    def __init__(self, spec: ModelSpec, engine: Engine, router: Router) -> None:
        super().__init__(spec, engine)
        self.router = router

    @contextmanager
    def request(self, text: str) -> Iterator[PruningAction]:
        started = time.perf_counter()
        action = self.router.choose(text)
        decided = time.perf_counter()
        self.controller_s += decided - started
        self.actions[action.label] += 1
        try:
            if action.target == "none":   # the dense model: nothing to apply
                yield action
            else:
                with self.engine.pruned(action):
                    yield action
        finally:
            self.model_s += time.perf_counter() - decided


def build_route(spec: ModelSpec, loaded, engine: Engine | None, router_factory: RouterFactory | None) -> Route:
    """The route for one spec; the policy's router is loaded here, so a bad checkpoint fails before any scoring."""
    if spec.kind == "dense":
        return Route(spec)
    if engine is None:
        raise EvaluationError(f"{spec.label} needs a pruning engine")
    if spec.kind == "static":
        return StaticRoute(spec, engine)
    if router_factory is None:
        from controller.router import load_router   # the controller package; only policy specs need it
        router_factory = load_router
    return PolicyRoute(spec, engine, router_factory(spec.checkpoint, loaded))
