"""A discrete-event simulation of the serving scheduler, timed by a measured step-time table.

Why: a live server decodes ~30 tokens a second per row here, so a rate sweep over policies, loads and
seeds would take days live; the simulator replays the same decisions (the scheduler's admission rule,
cache-compatible action sets, ``observe`` and the policy objects of ``environments.queueing.policies``) on the
table's times in milliseconds, which also lets a controller learn with gamma > 0: a decision now fills or
drains the queue that later decisions face. The live server on the same trace checks how far the table's
times are from the real ones (bench/serve_study.py reports the attainment error).
"""
from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.config import ServeConfig
from environments.queueing.policies import Pending, ServePolicy, ServeState, cache_signature, observe
from environments.queueing.step_table import StepTable
from pruners.actions import PruningAction

RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class SimRequest:
    arrival: float
    prompt_tokens: int
    output_tokens: int
    prompt: int = 0              # index of the prompt (its quality per action)


@dataclass
class SimOutcome:
    request: SimRequest
    rejected: bool = False
    token_times: list[float] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    late: bool = False

    @property
    def slo_met(self) -> bool:
        return not self.rejected and not self.late and len(self.token_times) == self.request.output_tokens

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.request.arrival if self.token_times else None


@dataclass(frozen=True)
class Step:
    """One decision, for a learner: the state, the action, and what followed (until the next decision)."""
    state: ServeState
    action: PruningAction
    duration_s: float
    on_time: int                 # tokens sent by their deadline in this step
    late: int                    # tokens sent after it
    rejected: int                # arrivals refused (queue full) since the previous decision
    finished_met: int            # requests finished this step with every token on time
    labels: tuple[str, ...]      # the action of each token sent (the served quality)


class ServingSimulator:
    """Replays the scheduler on table times; ``noise`` (lognormal sigma) perturbs each step, seeded."""

    def __init__(self, table: StepTable, cfg: ServeConfig, noise: float = 0.0, seed: int = 0) -> None:
        self.table, self.cfg, self.noise = table, cfg, noise
        self.rng = random.Random(seed)

    def _jitter(self) -> float:
        return self.rng.lognormvariate(0.0, self.noise) if self.noise else 1.0

    def run(self, requests: Sequence[SimRequest], policy: ServePolicy, menu: Sequence[PruningAction],
            on_step: Callable[[Step], None] | None = None) -> list[SimOutcome]:
        cfg, table = self.cfg, self.table
        pending = sorted(requests, key=lambda r: r.arrival)
        outcomes = {id(r): SimOutcome(r) for r in pending}
        waiting: collections.deque[SimRequest] = collections.deque()
        queued: dict[int, Pending] = {}          # a waiting request's Pending (fixed until admitted)
        running: list[SimRequest] = []
        arrivals: collections.deque[float] = collections.deque()
        t, i, signature, label = 0.0, 0, None, menu[0].label
        rejected = 0

        def due(r: SimRequest, k: int) -> float:
            return r.arrival + (cfg.slo_ttft_ms + k * cfg.slo_tpot_ms) / 1000

        def pend(r: SimRequest) -> Pending:
            return Pending(r.arrival, r.prompt_tokens, r.output_tokens, len(outcomes[id(r)].token_times))

        def send(r: SimRequest, now: float, action: str, counts: list[int]) -> bool:
            out = outcomes[id(r)]
            on_time = now <= due(r, len(out.token_times))
            out.late |= not on_time
            out.token_times.append(now)
            out.actions.append(action)
            counts[0 if on_time else 1] += 1
            done = len(out.token_times) >= r.output_tokens
            counts[2] += done and not out.late
            return done

        while i < len(pending) or waiting or running:
            if not waiting and not running:
                t = max(t, pending[i].arrival)
            while i < len(pending) and pending[i].arrival <= t:
                arrivals.append(pending[i].arrival)
                if len(waiting) >= cfg.max_queue:
                    outcomes[id(pending[i])].rejected = True
                    rejected += 1
                else:
                    waiting.append(pending[i])
                    queued[id(pending[i])] = pend(pending[i])
                i += 1
            while arrivals and arrivals[0] < t - RATE_WINDOW_S:
                arrivals.popleft()
            admitted = []
            while waiting and len(running) + len(admitted) < cfg.max_batch:
                admitted.append(waiting.popleft())
                del queued[id(admitted[-1])]
            if not running:
                signature = None
            allowed = [a for a in menu if signature in (None, cache_signature(a))]
            context = max((r.prompt_tokens + len(outcomes[id(r)].token_times) - 1 for r in running), default=0)
            state = observe(t, [pend(r) for r in running], [pend(r) for r in admitted],
                            [queued[id(r)] for r in itertools.islice(waiting, 64)], cfg, table, label, context,
                            len(arrivals) / RATE_WINDOW_S, 1.0)
            action = policy.decide(state, allowed)
            label, signature = action.label, cache_signature(action)
            started, counts, sent = t, [0, 0, 0], []
            for r in admitted:
                t += table.prefill_time(label, r.prompt_tokens) * self._jitter()
                sent.append(label)
                if not send(r, t, label, counts):
                    running.append(r)
            if running:
                context = max(r.prompt_tokens + len(outcomes[id(r)].token_times) - 1 for r in running)
                t += table.step_s(label, len(running), context) * self._jitter()
                sent += [label] * len(running)
                running = [r for r in running if not send(r, t, label, counts)]
            if on_step is not None:
                on_step(Step(state, action, t - started, counts[0], counts[1], rejected, counts[2], tuple(sent)))
            rejected = 0
        return [outcomes[id(r)] for r in pending]


def summarize(outcomes: Sequence[SimOutcome], quality: Callable[[SimOutcome], float] | None = None) -> dict:
    """SLO attainment, goodput (requests meeting the SLO per second of arrivals) and mean served quality."""
    if not outcomes:
        return {"requests": 0}
    span = max(o.request.arrival for o in outcomes) - min(o.request.arrival for o in outcomes) or 1.0
    met = sum(o.slo_met for o in outcomes)
    served = [o for o in outcomes if o.token_times]
    summary = {"requests": len(outcomes), "rejected": sum(o.rejected for o in outcomes),
               "slo_attainment": met / len(outcomes), "goodput_rps": met / span}
    if quality is not None and served:
        summary["served_quality"] = sum(quality(o) for o in served) / len(served)
    return summary
