"""The execution governor: how the model runs for each decision, separately from what is pruned.

Why: on a 2-core CPU the thread policy moved dense decode by more than any pruning action (issue
14), and the best thread count depends on whether other processes compete for the cores. The
OpenMP wait policy is fixed per process before torch loads (``runtime.openmp``, measured per
machine); this module picks, per decision, the thread count for the machine's current state (idle
or busy, read from telemetry) and the decode step: compiled per action (``runtime.compiled``: CUDA by
default), else on the CPU the lean step (``runtime.lean``: the model's layers run directly, without HF's
per-step framework work) where the model allows it, else HF's forward over a static cache.

The thread count is re-decided at run time (issue 25): the one-time probe's figures are only priors,
because a probe taken while other jobs ran chose 1 thread for the idle state (55 ms/token against 34
for 2 threads). Once the governor knows its model (``attach``, or ``decoder``), the first decision in
a state runs a live check (``measure_threads``: a few steps of the decoder it runs per candidate thread count, in
alternating order, about 0.5 s on an idle 2-core machine), reused for ``RuntimeConfig.recheck_s`` seconds
(``choose_threads`` is its rule). From then on the generations themselves decide: the decoder it hands out times
every step (``ObservedDecoder``), and ``runtime.threads.ThreadObservations`` ranks the counts on whole generations on
each in the state, running a count it thinks slower once in a while, less often the slower it is
(``RuntimeConfig.explore_cost``); under load the short check, and single steps on the other count, ranked the counts
unlike the generations. Measurement sessions that compare rows (speed probe, baselines, latency tables) decide with
``explore=False``, so no row is timed on a count chosen to explore.

Every timing records the ``RuntimeSetting`` it ran under (latency-table entries, speed results,
baselines rows), and the provenance block records the OpenMP choice, so a figure always says which
runtime produced it::

    governor = ExecutionGovernor(RuntimeConfig(), device=model.device)
    setting = governor.govern(hardware_state)      # sets torch threads; setting.label: "stock/2t/lean"
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from common.config import RuntimeConfig
from runtime import openmp
from runtime.compiled import CompiledDecoder, StaticCacheDecoder
from runtime.decode_probe import decode_seconds_per_token
from runtime.floor import step_bytes
from runtime.generation import Decoder, Prefill, Step, eager_decoder
from runtime.lean import LeanDecoder, unsupported
from runtime.openmp import BUSY, IDLE, OpenMPChoice
from runtime.threads import Generation, ThreadObservations, fastest, torch_threads
from machine.telemetry import HardwareProbe, HardwareState
from machine.load_signals import LoadAwareHardware

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
WINDOW_S = 0.2              # a decision without telemetry reads the CPU over this long, starting then


@dataclass(frozen=True)
class RuntimeSetting:
    """What one decision's generation ran under."""
    wait_policy: str
    threads: int
    state: str              # idle | busy: the machine state the thread count was chosen for; fixed | unmeasured
    decoder: str            # lean | eager (HF's forward over a static cache) | compiled
    # observed (the fastest count over this state's recent generations) | explore (a count run to keep its figure
    # current: runtime.threads) | live (a check in this state, before its generations ranked the counts) | prior (the
    # one-time probe) | fixed | unmeasured
    basis: str = "prior"

    @property
    def label(self) -> str:
        return f"{self.wait_policy}/{self.threads}t/{self.decoder}"

    def to_dict(self) -> dict:
        return asdict(self)


def others_load_cores(state: HardwareState) -> float | None:
    """Cores' worth of work that is not this process's: CPU time, or the run queue where telemetry has it.

    CPU time saturates on a full machine (100 % busy whatever the level), the run queue does not;
    our own busy cores and the reading thread are subtracted from both.
    """
    if state.cpu_percent is None:
        return None
    own = (state.process_cpu_percent or 0.0) / 100.0 * state.cpu_count
    by_time = state.cpu_percent / 100.0 * state.cpu_count - own
    run_queue = getattr(state, "run_queue", None)
    by_queue = run_queue - own - 1.0 if run_queue is not None else by_time
    return max(0.0, by_time, by_queue)


@dataclass(frozen=True)
class ThreadCheck:
    """A live check in one machine state: decode seconds per token per thread count, and when it ran."""
    s_per_token: dict[int, float]
    at: float               # time.monotonic()


def choose_threads(live: dict[int, float] | None, prior: dict[int, float], fallback: int) -> tuple[int, str]:
    """(threads, basis): the fastest of a live check when there is one, else of the probe's figures (priors),
    else ``fallback``. Live figures replace priors wholesale: a prior was taken at another moment, so
    mixing the two would compare two machine states."""
    if live:
        return fastest(live), "live"
    if prior:
        return fastest(prior), "prior"
    return fallback, "unmeasured"


@torch.inference_mode()
def measure_threads(model: torch.nn.Module, candidates: tuple[int, ...], steps: int = 3, rounds: int = 2,
                    max_seconds: float = 0.3, decoder: Decoder = eager_decoder) -> dict[int, float]:
    """Median step of ``decoder`` (the one the governor runs: a ranking of HF's forward, which is mostly per-step
    Python work, need not be the lean step's) per thread count, now: ``rounds`` in alternating order, each a
    16-token prefill and ``steps`` + 1 steps (the first untimed); the best round per count. Every count is timed in
    every round, even one that collapsed in the first: a single round of three steps can rank them wrongly (at idle a
    bench run decided 1 thread from one such round, then its re-check timed 2 threads 1.7x faster), and under load a
    collapse can be a passing moment (with the work-stealing kernel, 2 threads timed 1188 ms against 1 thread's 30 in
    one check under ``heavy``, then ran 49 ms per step against 1 thread's 63 in the same run's fixed rounds)."""
    out: dict[int, float] = {}
    for r in range(rounds):
        for threads in candidates if r % 2 == 0 else candidates[::-1]:
            with torch_threads(threads):
                s = decode_seconds_per_token(model, 16, steps, max_seconds, decoder)[0]
            out[threads] = min(out.get(threads, s), s)
    return out


def compile_wanted(mode: str, device: torch.device) -> bool:
    """auto: compiled on CUDA only (eager HF decode is launch-bound there; on this CPU compile measured no gain)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode '{mode}': choose from {', '.join(COMPILE_MODES)}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class ObservedDecoder:
    """The governor's CPU decoder where it runs the lean step: ``decoder``'s generations with every step timed, per
    byte it reads (``runtime.floor.step_bytes``), into the generation ``open_run`` hands out (None: not observed). A
    generation that falls back from the lean step (hooks on) is not observed: HF's forward would rank the counts on
    other work."""

    def __init__(self, decoder: LeanDecoder, open_run: Callable[[], Generation | None]) -> None:
        self.decoder, self._open_run = decoder, open_run

    def __call__(self, model: torch.nn.Module, pre: Prefill, new_tokens: int) -> Step:
        step = self.decoder(model, pre, new_tokens)
        run = None if self.decoder.falls_back(model) else self._open_run()
        if run is None:
            return step
        per_byte = 1.0 / step_bytes(model, pre.cache.get_seq_length() + new_tokens // 2)

        def timed(token: torch.Tensor, position: int) -> torch.Tensor:
            started = time.perf_counter()
            logits = step(token, position)
            run.add((time.perf_counter() - started) * per_byte)
            return logits
        return timed


class ExecutionGovernor:
    """Chooses and applies the thread count per decision; knows the process's wait policy and decoder."""

    def __init__(self, config: RuntimeConfig | None = None, choice: OpenMPChoice | None = None,
                 device: torch.device | str = "cpu", clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or RuntimeConfig()
        self.choice = choice or openmp.active()
        self.device = torch.device(device)
        self.compiled = compile_wanted(self.config.compile, self.device)
        # what ``decoder`` builds: "eager" where the lean step cannot run the model (found out by ``decoder``)
        self.decoder_name = "compiled" if self.compiled else "lean" if self.device.type == "cpu" else "eager"
        self._probe: HardwareProbe | None = None
        self._model: torch.nn.Module | None = None
        self._decoder: Decoder = eager_decoder     # the step live checks time: the one ``attach`` built
        self._observed: ObservedDecoder | None = None    # ``_decoder`` timed, where it is the lean step
        self._state: str | None = None             # the machine state of the last decision taken by state
        self._clock = clock
        self.checks: dict[str, ThreadCheck] = {}
        self.observations = ThreadObservations(explore_cost=self.config.explore_cost)

    def attach(self, model: torch.nn.Module, engine=None) -> None:
        """The model live checks time, on the decode step this governor runs it with (CPU only: on CUDA the thread
        count is not the decode's bottleneck). Why the step is built here: a check before ``decoder`` timed HF's
        forward, which 1 and 2 threads run alike (mostly Python), and at idle a bench run then decoded two rounds on
        1 thread at 36 ms per token against 24 on 2."""
        if self.device.type != "cpu":
            return
        self._model = model
        if not self.compiled:
            self._decoder = self._step(model, engine)
            lean = isinstance(self._decoder, LeanDecoder)    # the step whose bytes the observations divide by
            self._observed = ObservedDecoder(self._decoder, self._open_run) if lean else None

    def candidates(self) -> tuple[int, ...]:
        return openmp.thread_candidates(openmp.usable_cores())

    def priors(self, state: str) -> dict[int, float]:
        """The one-time probe's seconds per token for this process's policy in ``state`` (the measured rule
        alone where the probe figures are absent)."""
        figures = {p.threads: p.s_per_token for p in self.choice.probes
                   if p.policy == self.choice.policy and p.state == state}
        threads = self.choice.threads(state)
        return figures or ({threads: 0.0} if threads else {})

    def live(self, state: str) -> dict[int, float] | None:
        """A fresh live check of ``state``: reused within ``recheck_s``, else run now (when a model is attached)."""
        check = self.checks.get(state)
        now = self._clock()
        if check is not None and now - check.at < self.config.recheck_s:
            return check.s_per_token
        if self._model is None or self.config.recheck_s <= 0:
            return None
        figures = measure_threads(self._model, self.candidates(), decoder=self._decoder)
        self.checks[state] = ThreadCheck(figures, self._clock())
        log.info("runtime: live thread check (%s machine): %s", state,
                 ", ".join(f"{t}t {s * 1e3:.1f} ms/token" for t, s in sorted(figures.items())))
        return figures

    def machine_state(self, hardware: HardwareState | LoadAwareHardware | None = None) -> str:
        """idle | busy; a contention-state observation (``LoadAwareHardware``) is read through its telemetry."""
        if isinstance(hardware, LoadAwareHardware):
            hardware = hardware.reading
        others = others_load_cores(hardware if hardware is not None else self._read())
        return BUSY if others is not None and others >= self.config.busy_cores else IDLE

    def _read(self) -> HardwareState:
        """The machine now: a fresh CPU window of ``WINDOW_S``.

        Not the window since the previous decision: a calibration of one load level follows another,
        and a window spanning the previous (loaded) level ran the next idle table with the busy thread
        count (issue 16's demo: idle dense 80 ms/token in some rounds, 51 ms in others).
        """
        if self._probe is None:
            self._probe = HardwareProbe()
        start = self._probe.cpu_counters()
        time.sleep(WINDOW_S)
        return self._probe.read(start, self._probe.cpu_counters())

    def decide(self, hardware: HardwareState | LoadAwareHardware | None = None,
               explore: bool = True) -> RuntimeSetting:
        """The thread count: the configured one ("fixed"); torch's current one where the wait policy was set
        by hand ("unmeasured": no rule, nothing read); else, for the machine's state ("idle" | "busy"), the
        fastest over its recent generations, or a count due to be explored (not with ``explore=False``: a session
        whose rows are compared), else the fastest in a live check, else in the probe's priors."""
        decoder = self.decoder_name
        if self.config.threads:
            return RuntimeSetting(self.choice.policy, self.config.threads, "fixed", decoder, "fixed")
        if self.choice.threads_idle is None:    # a policy set by hand: the caller's thread count stands
            return RuntimeSetting(self.choice.policy, torch.get_num_threads(), "unmeasured", decoder, "unmeasured")
        state = self.machine_state(hardware)
        self._state = state if self.config.recheck_s > 0 else None
        observed = self.observations.choose(state, self.candidates(), explore) if self._state else None
        if observed is not None:
            return RuntimeSetting(self.choice.policy, observed[0], state, decoder, observed[1])
        threads, basis = choose_threads(self.live(state), self.priors(state), torch.get_num_threads())
        return RuntimeSetting(self.choice.policy, threads, state, decoder, basis)

    def _open_run(self) -> Generation | None:
        """Where a generation's step timings go (the last decision's machine state, the count it runs on); None where
        the governor does not choose the count by state (fixed, a hand-set policy, checks off)."""
        if self._state is None:
            return None
        return self.observations.open(self._state, torch.get_num_threads())

    def apply(self, setting: RuntimeSetting) -> RuntimeSetting:
        if torch.get_num_threads() != setting.threads:
            torch.set_num_threads(setting.threads)
            log.debug("runtime: %s (%s machine)", setting.label, setting.state)
        return setting

    def govern(self, hardware: HardwareState | LoadAwareHardware | None = None,
               explore: bool = True) -> RuntimeSetting:
        """Decide for the machine's current state and apply it; returns what now runs."""
        return self.apply(self.decide(hardware, explore))

    def decoder(self, model: torch.nn.Module, engine=None) -> Decoder:
        """The decode step this governor runs: compiled per action (runtime.compiled), the lean step on the CPU
        (runtime.lean; it still falls back per generation, e.g. while hooks are on), its steps timed to rank the thread
        counts (``ObservedDecoder``), else HF's forward over a static cache. The model is also the one its live
        thread checks time (``attach``)."""
        self.attach(model, engine)
        if self.compiled:
            return CompiledDecoder(model, engine)
        if self.device.type != "cpu":
            return self._step(model, engine)
        return self._observed if self._observed is not None else self._decoder

    def _step(self, model: torch.nn.Module, engine=None) -> Decoder:
        """The uncompiled step: lean where it can run the model, else HF's forward over a static cache."""
        if self.decoder_name == "lean":
            reason = unsupported(model, engine)
            if reason is None:
                return LeanDecoder(model, engine)
            log.info("runtime: lean decode off for this model (%s): HF's forward over a static cache", reason)
            self.decoder_name = "eager"
        return StaticCacheDecoder(model, engine)

    def describe(self) -> dict:
        """For provenance: the OpenMP choice (with its probes) and this governor's rule."""
        checks = {state: {str(t): s for t, s in c.s_per_token.items()} for state, c in self.checks.items()}
        observed = {state: {str(t): s * 1e9 for t, s in self.observations.figures(state).items()}
                    for state in (IDLE, BUSY)}
        return {"openmp": self.choice.to_dict(), "config": self.config.to_dict(),
                "decoder": self.decoder_name, "device": str(self.device),
                "live_checks": checks, "observed_s_per_gb": {k: v for k, v in observed.items() if v}}

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
