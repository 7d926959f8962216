"""Iteration-level (continuous) batching with a pruning decision before every step.

One worker thread owns the model. Each iteration it drops cancelled rows, admits waiting requests up
to ``max_batch`` (oldest first), asks the policy for an action among those the running batch's KV cache
allows (``environments.queueing.policies.cache_signature``), applies it if it changed (a prefix view: well
under a millisecond), prefills the admitted prompts under it, and decodes one token for every row.
Tokens go back to the request's asyncio queue on the server's event loop; the HTTP side never touches
the model.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from common.config import ServeConfig
from environments.queueing.policies import Pending, ServePolicy, ServeState, cache_signature, observe
from environments.queueing.step_table import StepTable
from pruners.actions import PruningAction
from runtime.generation import prefill
from serving.batch import RunningBatch
from serving.metrics import ServerMetrics

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0        # arrivals counted over this window for the rate estimate
SLOWDOWN_EWMA = 0.2         # weight of the newest step in the measured/predicted step-time ratio


class QueueFull(RuntimeError):
    """The bounded queue is full (HTTP 429); ``retry_after_s`` estimates when a slot frees."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server's queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Draining(RuntimeError):
    """The server is shutting down (HTTP 503): requests already accepted still finish."""


@dataclass(frozen=True)
class TokenEvent:
    token: int
    action: str


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str          # stop | length | cancelled


@dataclass(frozen=True)
class ErrorEvent:
    message: str


@dataclass(eq=False)
class ServeRequest:
    """One generation: its prompt and sampling, its deadlines, and where its tokens go."""
    prompt_ids: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    # False: no TokenEvent per token, only the DoneEvent (tokens and actions are read from the request then). A
    # non-streamed answer without stop strings needs nothing sooner, and each event wakes the HTTP thread,
    # which takes a core from the decode's OpenMP team for a moment
    token_events: bool = True
    arrival: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)       # the action of each token
    token_times: list[float] = field(default_factory=list)
    late: bool = False                                      # some token came after its deadline
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """The client left or a stop string ended it: its slot is freed before the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def due(self, k: int, slo: ServeConfig) -> float:
        """When token k (0: the first) is due."""
        return self.arrival + (slo.slo_ttft_ms + k * slo.slo_tpot_ms) / 1000

    def sample(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        if self._generator is None:
            self._generator = torch.Generator(device=logits.device)
            self._generator.manual_seed(self.seed if self.seed is not None else torch.seed())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def emit(self, event: TokenEvent | DoneEvent | ErrorEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:        # the event loop has closed: nobody is listening any more
            pass


class Scheduler:
    """Continuous batching on one model with a per-step pruning decision."""

    def __init__(self, model: nn.Module, engine, policy: ServePolicy, menu: Sequence[PruningAction],
                 cfg: ServeConfig, table: StepTable | None, metrics: ServerMetrics, eos: set[int],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.model, self.engine, self.policy, self.menu = model, engine, policy, list(menu)
        self.cfg, self.table, self.metrics, self.eos, self.clock = cfg, table, metrics, eos, clock
        self.batch = RunningBatch()
        self._waiting: collections.deque[ServeRequest] = collections.deque()
        self._arrivals: collections.deque[float] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._signature: str | None = None
        self._slowdown = 1.0
        self._e2e_ewma = 1.0
        self._thread: threading.Thread | None = threading.Thread(target=self._run, name="serve-scheduler", daemon=True)
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        """Start the worker thread (unless ``keep_on_this_thread`` was called: then ``run`` is the loop)."""
        if self._thread is not None:
            self._thread.start()

    def keep_on_this_thread(self) -> None:
        """Run the loop on the caller's thread (``run``) rather than a thread of its own.

        Why (``serving.server.run_server``): the thread that loaded the model owns the process's OpenMP pool.
        Decode steps run from a second thread start a second pool, and with more pool threads than cores
        libgomp stops spinning between parallel regions: the same decode step measured 17-60 % slower there
        (2 threads, 2 cores; docs/serving.md).
        """
        self._thread = None

    def run(self) -> None:
        """The scheduling loop on the calling thread, until ``close``."""
        self._run()

    def submit(self, request: ServeRequest) -> None:
        """Queue a request, or raise QueueFull / Draining."""
        with self._wake:
            if self._closing:
                self.metrics.rejected.labels(reason="draining").inc()
                raise Draining("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.cfg.max_queue:
                self.metrics.rejected.labels(reason="queue_full").inc()
                waits = len(self._waiting) / max(1, self.cfg.max_batch)
                raise QueueFull(max(1, min(60, math.ceil(waits * self._e2e_ewma))))
            self._waiting.append(request)
            self._arrivals.append(request.arrival)
            self.metrics.queue.set(len(self._waiting))
            self._wake.notify()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every accepted one, then stop the worker."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            if self._thread.is_alive():
                self._thread.join(timeout)
        else:
            self._stopped.wait(timeout)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        try:
            while True:
                admitted = self._admit()
                if admitted is None:
                    break
                try:
                    self._iterate(admitted)
                except Exception as err:   # noqa: BLE001 — one failed step must not take the server down
                    log.exception("serving step failed")
                    for request in [*self.batch.rows, *admitted]:
                        request.emit(ErrorEvent(f"generation failed: {err}"))
                    self.batch = RunningBatch()
        finally:
            self.engine.restore()
            self._stopped.set()

    def _admit(self) -> list[ServeRequest] | None:
        """Wait for work; take the requests that fit. None: closing and nothing left."""
        with self._wake:
            while not self._waiting and not len(self.batch) and not self._closing:
                self._wake.wait()
            if self._closing and not self._waiting and not len(self.batch):
                return None
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                request.emit(DoneEvent("cancelled"))
            admitted = []
            while self._waiting and len(self.batch) + len(admitted) < self.cfg.max_batch:
                admitted.append(self._waiting.popleft())
            self.metrics.queue.set(len(self._waiting))
            return admitted

    def _iterate(self, admitted: list[ServeRequest]) -> None:
        gone = [r for r in self.batch.rows if r.cancelled]
        for request in gone:
            request.emit(DoneEvent("cancelled"))
        self.batch.leave(gone)
        if not len(self.batch):
            self._signature = None
        allowed = [a for a in self.menu if self._signature in (None, cache_signature(a))]
        started = self.clock()
        action = self.policy.decide(self._state(admitted), allowed)
        self.metrics.decision.observe(self.clock() - started)
        if action != self.engine.current_action:
            self.engine.apply(action)
        self._signature = cache_signature(action)
        for request in admitted:
            self._prefill(request, action)
        if len(self.batch):
            self._step(action)
        self.metrics.running.set(len(self.batch))

    def _prefill(self, request: ServeRequest, action: PruningAction) -> None:
        ids = torch.tensor(request.prompt_ids, device=next(self.model.parameters()).device)[None]
        pre = prefill(self.model, ids)
        token = request.sample(pre.logits[0])
        self.metrics.actions.labels(action=action.label).inc()
        if not self._record(request, token, action):
            self.batch.join(request, pre, len(request.prompt_ids), token)

    def _step(self, action: PruningAction) -> None:
        started = self.clock()
        logits = self.batch.step(self.model)
        greedy = logits.argmax(dim=-1).tolist()
        tokens = [g if r.temperature == 0 else r.sample(logits[i]) for i, (r, g) in enumerate(zip(self.batch.rows, greedy))]
        elapsed = self.clock() - started
        if self.table is not None:
            predicted = self.table.step_s(action.label, len(self.batch), self.batch.context)
            self._slowdown += SLOWDOWN_EWMA * (min(max(elapsed / predicted, 0.2), 5.0) - self._slowdown)
        self.metrics.actions.labels(action=action.label).inc()
        self.batch.advance(tokens)
        finished = [r for r, t in zip(self.batch.rows, tokens) if self._record(r, t, action)]
        self.batch.leave(finished)

    def _record(self, request: ServeRequest, token: int, action: PruningAction) -> bool:
        """Send a token; True when the request is finished (and told so)."""
        now = self.clock()
        if now > request.due(len(request.tokens), self.cfg):
            request.late = True
        request.tokens.append(token)
        request.actions.append(action.label)
        request.token_times.append(now)
        if request.token_events:
            request.emit(TokenEvent(token, action.label))
        reason = None
        if token in self.eos and not request.ignore_eos:
            reason = "stop"
        elif len(request.tokens) >= request.max_tokens:
            reason = "length"
        if reason is None:
            return False
        request.emit(DoneEvent(reason))
        self._finished(request)
        return True

    def _finished(self, request: ServeRequest) -> None:
        ttft = request.token_times[0] - request.arrival
        e2e = request.token_times[-1] - request.arrival
        tpot = (e2e - ttft) / (len(request.tokens) - 1) if len(request.tokens) > 1 else None
        self._e2e_ewma += 0.1 * (e2e - self._e2e_ewma)
        self.metrics.finished(ttft, tpot, e2e, not request.late)

    def _state(self, admitted: list[ServeRequest]) -> ServeState:
        now = self.clock()
        while self._arrivals and self._arrivals[0] < now - RATE_WINDOW_S:
            self._arrivals.popleft()
        return observe(now, [_pending(r) for r in self.batch.rows], [_pending(r) for r in admitted],
                       [_pending(r) for r in itertools.islice(self._waiting, 64)], self.cfg, self.table,
                       self.engine.current_action.label, self.batch.context, len(self._arrivals) / RATE_WINDOW_S,
                       self._slowdown)


def _pending(request: ServeRequest) -> Pending:
    return Pending(request.arrival, len(request.prompt_ids), request.max_tokens, len(request.tokens))
