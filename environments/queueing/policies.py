"""Who picks the pruning action of a serving step: what a server knows, and the non-learned arms.

The same objects decide in the live server (serving.scheduler) and in the queueing simulator
(environments.queueing.simulator), so a policy fitted or trained in simulation is the one that serves.
A decision reads a ``ServeState`` and returns one of the actions the running batch allows (a batch
whose KV cache a head or layer action shaped keeps that action until it drains); it costs microseconds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Protocol

from common.config import ServeConfig
from environments.queueing.step_table import StepTable
from pruners.actions import NONE, PruningAction

CACHE_SHAPING = ("attention_heads", "transformer_layers")   # their KV cache differs in shape from the dense one


def cache_signature(action: PruningAction) -> str:
    """Actions with equal signatures share a KV cache: width actions all share the dense one."""
    return action.label if action.target in CACHE_SHAPING else "dense"


@dataclass(frozen=True)
class ServeState:
    """What the scheduler knows before a step (the controller's observation)."""
    queue: int               # requests waiting for a slot
    batch: int               # rows the next step decodes (running + admitted now)
    slack_s: float           # tightest time left before a due token (running rows, the oldest waiting request)
    context: int             # longest context in the batch (tokens)
    arrival_rate: float      # recent arrivals per second
    slowdown: float          # recent measured step time / the table's prediction (1: as calibrated)
    waiting_prompt_tokens: float = 0.0   # mean prompt length of the waiting requests

    def vector(self) -> list[float]:
        """Features for a Q-network: bounded, on comparable scales."""
        slack = max(min(self.slack_s, 10.0), -10.0)
        return [math.log1p(self.queue), math.log1p(self.batch), slack, math.log1p(self.context) / 8,
                math.log1p(self.arrival_rate), min(self.slowdown, 5.0), math.log1p(self.waiting_prompt_tokens) / 8]

    def as_tuple(self) -> tuple:
        return astuple(self)


STATE_SIZE = len(ServeState(0, 0, 0.0, 0, 0.0, 1.0).vector())


@dataclass(frozen=True)
class Pending:
    """What the observation reads of one request."""
    arrival: float
    prompt_tokens: int
    max_tokens: int
    produced: int            # tokens already sent


def observe(now: float, running: Sequence[Pending], admitted: Sequence[Pending], waiting: Sequence[Pending],
            cfg: ServeConfig, table: StepTable | None, label: str, context: int, arrival_rate: float,
            slowdown: float) -> ServeState:
    """The state before a step, identical in the live scheduler and the simulator.

    Slack: the tightest of every batched row's next deadline (an admitted row's second token, after the
    admitted prompts' predicted prefill) and of every waiting request's first-token deadline, less the prefills
    ahead of it, spread over the steps until a slot frees for it. (Only the oldest waiting request, SuperServe's rule, saw the backlog too
    late: on a synthetic table it tied dense at 1.5x dense's capacity where a static smaller action met every SLO.)
    """
    def due(p: Pending, k: int) -> float:
        return p.arrival + (cfg.slo_ttft_ms + k * cfg.slo_tpot_ms) / 1000

    prefill_s = sum(table.prefill_time(label, p.prompt_tokens) for p in admitted) if table is not None else 0.0
    rows = [*running, *admitted]
    slack = min((due(p, max(p.produced, 1)) - now - prefill_s for p in rows), default=math.inf)
    if waiting:
        # waiting request j starts when the (j+1)-th slot frees: running rows free theirs as they finish, later
        # slots after whole generations of the requests admitted before it; its first-token budget is spread
        # over the steps until then (one step per token of every batch it waits behind)
        free = sorted(p.max_tokens - p.produced for p in rows) if len(rows) >= cfg.max_batch else []
        free = [0] * (cfg.max_batch - len(rows)) + free
        mean_new = sum(p.max_tokens for p in waiting) / len(waiting)
        each_prefill = table.prefill_time(label, round(sum(p.prompt_tokens for p in waiting) / len(waiting))) \
            if table is not None else 0.0
        for j, p in enumerate(waiting):
            steps = free[j % cfg.max_batch] + (j // cfg.max_batch) * mean_new
            slack = min(slack, (due(p, 0) - now - prefill_s - (j + 1) * each_prefill) / (steps + 1))
    context = max(context, *(p.prompt_tokens for p in admitted), 0) + 1
    mean_prompt = sum(p.prompt_tokens for p in waiting) / len(waiting) if waiting else 0.0
    return ServeState(queue=len(waiting), batch=len(rows), slack_s=slack, context=context, arrival_rate=arrival_rate,
                      slowdown=slowdown, waiting_prompt_tokens=mean_prompt)


class ServePolicy(Protocol):
    name: str

    def decide(self, state: ServeState, allowed: Sequence[PruningAction]) -> PruningAction: ...


@dataclass(frozen=True)
class StaticPolicy:
    """One action for every step (``dense`` is the static ``none``)."""
    action: PruningAction

    @property
    def name(self) -> str:
        return "dense" if self.action == NONE else f"static:{self.action.label}"

    def decide(self, state: ServeState, allowed: Sequence[PruningAction]) -> PruningAction:
        return self.action


@dataclass(frozen=True)
class SlackPolicy:
    """SlackFit (SuperServe): the largest sub-network whose predicted step meets the tightest slack.

    "Largest" is the menu's order (--serve-actions lists the largest sub-network first). Predicted step = the
    table's time for this batch and context x the recent slowdown, so a loaded machine or a table from a quieter
    hour shifts the choice toward smaller actions. No action fits: the fastest in the table.
    """
    table: StepTable
    name: str = "slack"

    def decide(self, state: ServeState, allowed: Sequence[PruningAction]) -> PruningAction:
        steps = [self.table.step_s(a.label, state.batch, state.context) for a in allowed]
        for action, step in zip(allowed, steps):
            if step * state.slowdown <= state.slack_s:
                return action
        return allowed[min(range(len(allowed)), key=steps.__getitem__)]


@dataclass(frozen=True)
class RulePolicy:
    """Prune to ``action`` while at least ``depth`` requests are outstanding (queued + running), else dense."""
    depth: int
    action: PruningAction

    @property
    def name(self) -> str:
        return f"rule:{self.depth}:{self.action.label}"

    def decide(self, state: ServeState, allowed: Sequence[PruningAction]) -> PruningAction:
        wanted = self.action if state.queue + state.batch >= self.depth else NONE
        return wanted if wanted in allowed else allowed[0]


def parse_policy(text: str, table: StepTable | None) -> ServePolicy | None:
    """dense | static:ACTION | slack | rule:DEPTH:ACTION; None for anything else (a checkpoint path)."""
    if text == "dense":
        return StaticPolicy(NONE)
    if text.startswith("static:"):
        return StaticPolicy(_action(text.removeprefix("static:"), text))
    if text == "slack":
        if table is None:
            raise ValueError("--serve-policy slack needs a step-time table: pass --step-table or let the server "
                             "measure one")
        return SlackPolicy(table)
    if text == "rule" or text.startswith("rule:"):
        depth, _, action = text.removeprefix("rule:").partition(":")
        if not depth.isdigit() or int(depth) < 1 or not action:
            raise ValueError(f"--serve-policy {text}: write rule:DEPTH:ACTION, e.g. rule:6:ffn_neurons:0.4 (the "
                             "depth bench/serve_study.py fits on training traces)")
        return RulePolicy(int(depth), _action(action, text))
    return None


def _action(label: str, text: str) -> PruningAction:
    try:
        return PruningAction.parse(label)
    except ValueError as err:
        raise ValueError(f"--serve-policy {text}: {err}") from err


def policy_actions(policy: ServePolicy, menu: Sequence[PruningAction]) -> list[PruningAction]:
    """The actions a policy can pick: static and rule arms their own, the others the menu."""
    if isinstance(policy, StaticPolicy):
        return [policy.action]
    if isinstance(policy, RulePolicy):
        return list(dict.fromkeys([NONE, policy.action]))
    return list(menu)
