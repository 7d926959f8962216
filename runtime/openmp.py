"""The OpenMP wait policy of this machine, chosen by measurement before torch loads (imports no torch).

Why: torch's CPU kernels run on libgomp, which reads its wait policy once, when torch is imported.
A spinning policy keeps idle worker threads hot between the hundreds of small ops of a decode step
(on the machine issue 14 was measured on: 31 ms/token against 55 ms with ``OMP_WAIT_POLICY=PASSIVE``)
but collapses when other processes compete for the cores (1.5-1.9 s/token: a spinning thread that
loses its core stalls every op), while passive waiting survives contention. No setting is best in
both states and the gap depends on the CPU, so it is measured, not assumed.

How: ``measure`` starts one child process per candidate policy (``runtime.decode_probe``) that
times the dense decode step of the embedded model at each thread count, on the machine as it is and
then under the heaviest load preset (``contention.presets()["loaded"]``), in two rounds of
alternating policy order.
``decide`` keeps the policies that are no slower under load than today's setting (passive with every
core) by more than ``tolerance``, and picks the fastest idle one among them; the thread count per
state is that policy's fastest. One more child then times row-major against column-major weights
(``model_loader.set_weight_layout``: MKL's one-token matmul streams one of them faster on some CPUs)
and keeps column-major only where it wins by ``LAYOUT_MARGIN``. The choice is cached per machine
(CPU model, usable cores, torch and Python versions) under the project cache, so only the first run
on a machine pays the probe (about 1 min on an idle 2-core machine, 3 min on a loaded one).

Entry points: ``configure()`` at the very top of the CLI (and tests/conftest.py) sets the
environment before torch is imported; ``active()`` tells a running process what it runs under
(``runtime.governor.ExecutionGovernor`` and the provenance block read it). The environment is
the state, because libgomp's is: ``configure`` also records ``ADAPTIVE_PRUNING_OMP_CHOICE`` so child
processes follow the same choice, and a user who sets ``OMP_WAIT_POLICY``/``GOMP_SPINCOUNT`` or
``ADAPTIVE_PRUNING_OMP=<policy>`` is obeyed without a probe.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from common import hub
from common.config import WEIGHT_LAYOUT_ENV
from common.files import PROJECT_ROOT, atomic_write_text

log = logging.getLogger(__name__)

OVERRIDE = "ADAPTIVE_PRUNING_OMP"     # auto (default) | a policy name: use it, never probe
MARK = "ADAPTIVE_PRUNING_OMP_CHOICE"  # "<source>:<policy>", set by configure() for this process and its children
ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
IDLE, BUSY = "idle", "busy"           # BUSY: the heaviest contention preset (runtime.decode_probe)


@dataclass(frozen=True)
class WaitPolicy:
    name: str
    env: tuple[tuple[str, str], ...]  # what libgomp reads; empty = its defaults
    why: str


POLICIES = (
    WaitPolicy("passive", (("OMP_WAIT_POLICY", "PASSIVE"),),
               "threads sleep at once between ops: no core lost to spinning under contention"),
    WaitPolicy("stock", (), "libgomp's default: spin ~300k iterations (about 3 ms) before sleeping"),
    WaitPolicy("spin-short", (("GOMP_SPINCOUNT", "20000"),),
               "spin about 0.2 ms: covers the gap between ops, then yields the core"),
)
REFERENCE = POLICIES[0]               # today's setting: the loaded state must not lose to it
STOCK = POLICIES[1]                   # what stock torch runs: another policy must beat it clearly (STOCK_MARGIN)
STOCK_MARGIN = 0.05
LAYOUT_MARGIN = 0.03                  # column-major weights only when they decode at least 3 % faster


def policy(name: str) -> WaitPolicy:
    for p in POLICIES:
        if p.name == name:
            return p
    raise ValueError(f"unknown OpenMP wait policy '{name}' ({OVERRIDE}): choose from "
                     f"auto, {', '.join(p.name for p in POLICIES)}")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_candidates(cores: int) -> tuple[int, ...]:
    """All cores, half of them and one: the counts worth probing (2 and 1 on a 2-core machine)."""
    return tuple(sorted({cores, max(1, cores // 2), 1}, reverse=True))


@dataclass(frozen=True)
class Probe:
    """Median decode step of the dense model under one policy, machine state and thread count."""
    policy: str
    state: str
    threads: int
    s_per_token: float


@dataclass
class OpenMPChoice:
    """What the process runs under: the wait policy, the thread count for each machine state, and the
    weight layout model_loader applies (row-major as loaded, or column-major where it measured faster)."""
    policy: str
    threads_idle: int | None           # None: no measured rule, the caller's thread count stands
    threads_busy: int | None
    source: str                        # measured | override (by name) | environment (user's OMP_*) | default | unset
    machine: str                       # the cache key: CPU, usable cores, torch and Python versions
    probes: list[Probe] = field(default_factory=list)
    measured_at: str | None = None
    layout: str = "row"
    layout_gain: float | None = None   # measured row-major / column-major s per token (dense, idle)

    def threads(self, state: str) -> int | None:
        return self.threads_busy if state == BUSY else self.threads_idle

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OpenMPChoice":
        return cls(**{**d, "probes": [Probe(**p) for p in d.get("probes", [])]})


# ------------------------------------------------------------------ machine key and cache

def machine_key() -> str:
    """Readable and unique enough: a cached choice must not follow the project to another machine."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    digest = hashlib.sha1((cpu_model() or platform.machine()).encode()).hexdigest()[:8]
    return f"{usable_cores()}cpu-torch{torch_version}-py{platform.python_version()}-{digest}"


def cpu_model() -> str | None:
    """The 'model name' line of /proc/cpuinfo (Linux); platform.processor() elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cache_path(key: str | None = None) -> Path:
    return hub.cache_dir() / "runtime" / f"openmp-{key or machine_key()}.json"


def load_cached(key: str | None = None) -> OpenMPChoice | None:
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        choice = OpenMPChoice.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError) as err:
        log.warning("ignoring unreadable OpenMP choice cache %s (%s): it will be measured again", path, err)
        return None
    if choice.probes:   # the current rule, re-applied to the stored figures: a rule change needs no new probe
        try:
            choice.policy, choice.threads_idle, choice.threads_busy = decide(choice.probes)
        except ValueError:
            pass
    return choice


# ------------------------------------------------------------------ measurement and decision

def decide(probes: list[Probe], tolerance: float = 0.10, margin: float = STOCK_MARGIN) -> tuple[str, int, int]:
    """(policy, threads idle, threads busy): the fastest idle policy among those no slower under
    load than the reference (passive, most threads) by more than ``tolerance``; libgomp's stock
    policy whenever it is admissible and within ``margin`` of that fastest one.

    Why the margin: the policy is fixed for the process, and idle figures of a probe taken while
    other jobs ran differ by noise (issue 25: spin-short won by 2 % on such a probe and then ran 13 %
    slower than stock on a quiet machine). Under load the thread governor runs one thread, where no
    wait policy spins, so the stock policy loses nothing there.
    The reference is always admissible, so a probe set without it cannot be decided.
    """
    table = {(p.policy, p.state, p.threads): p.s_per_token for p in probes}
    best: dict[tuple[str, str], tuple[float, int]] = {}
    for (name, state, threads), s in table.items():
        if (name, state) not in best or s < best[name, state][0]:
            best[name, state] = (s, threads)
    most = max((t for (name, _, t) in table if name == REFERENCE.name), default=None)
    reference = table.get((REFERENCE.name, BUSY, most))
    if reference is None:
        raise ValueError(f"no busy-state probe of the reference policy '{REFERENCE.name}'")
    admissible = [p.name for p in POLICIES
                  if (p.name, IDLE) in best and (p.name, BUSY) in best
                  and best[p.name, BUSY][0] <= (1 + tolerance) * reference]
    name = min(admissible, key=lambda n: best[n, IDLE][0])   # min keeps POLICIES order on ties
    if STOCK.name in admissible and best[STOCK.name, IDLE][0] <= (1 + margin) * best[name, IDLE][0]:
        name = STOCK.name
    return name, best[name, IDLE][1], best[name, BUSY][1]


def _probe_env(p: WaitPolicy, layout: str = "row") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(dict(p.env))
    env.pop(MARK, None)
    env[WEIGHT_LAYOUT_ENV] = layout
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def run_probe(p: WaitPolicy, threads: tuple[int, ...], model: str, tokens: int, max_seconds: float,
              states: tuple[str, ...] = (IDLE, BUSY), layout: str = "row",
              timeout_s: float = 300.0) -> dict[str, dict[int, float]]:
    """One child process under policy ``p`` (and weight ``layout``): seconds per decoded token per state
    and thread count."""
    cmd = [sys.executable, "-m", "runtime.decode_probe", "--model", model, "--threads",
           ",".join(map(str, threads)), "--states", ",".join(states), "--tokens", str(tokens),
           "--max-seconds", str(max_seconds)]
    done = subprocess.run(cmd, env=_probe_env(p, layout), cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"decode probe under '{p.name}' failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {state: {int(t): float(s) for t, s in row.items()} for state, row in result.items()}


def measure_layout(p: WaitPolicy, threads: int, model: str, pairs: int = 6, tokens: int = 8,
                   max_seconds: float = 3.0, timeout_s: float = 300.0) -> float:
    """Row-major / column-major dense decode time under policy ``p`` (runtime.decode_probe --layout-pairs)."""
    cmd = [sys.executable, "-m", "runtime.decode_probe", "--model", model, "--threads", str(threads),
           "--tokens", str(tokens), "--max-seconds", str(max_seconds), "--layout-pairs", str(pairs)]
    done = subprocess.run(cmd, env=_probe_env(p), cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"layout probe failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["layout_gain"])


def measure(model: str = "smollm2-135m", rounds: int = 2, tokens: int = 8, max_seconds: float = 3.0,
            policies: tuple[WaitPolicy, ...] = POLICIES) -> list[Probe]:
    """Probe every policy idle and under the busy level, ``rounds`` times in alternating policy order
    (one child per policy and round, idle then busy); each cell is the median over rounds."""
    threads = thread_candidates(usable_cores())
    samples: dict[tuple[str, str, int], list[float]] = {}
    schedule = [(r, p) for r in range(rounds) for p in (policies if r % 2 == 0 else policies[::-1])]
    # A progress bar: this runs before the CLI configures logging, on the first run on a machine (1-3 min).
    for r, p in tqdm(schedule, desc="OpenMP wait-policy probe (once per machine)", unit="child"):
        for state, row in run_probe(p, threads, model, tokens, max_seconds).items():
            for t, s in row.items():
                samples.setdefault((p.name, state, t), []).append(s)
                log.info("OpenMP probe round %d: %s, %s, %d threads: %.1f ms/token", r + 1, p.name, state, t,
                         s * 1e3)
    return [Probe(name, state, t, statistics.median(v)) for (name, state, t), v in samples.items()]


# ------------------------------------------------------------------ applying a choice

def _current_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ENV_KEYS if k in os.environ}


def _apply(p: WaitPolicy, source: str) -> OpenMPChoice:
    for key in ENV_KEYS:
        os.environ.pop(key, None)
    os.environ.update(dict(p.env))
    os.environ[MARK] = f"{source}:{p.name}"
    return active()


def _marked() -> tuple[str, WaitPolicy] | None:
    """(source, policy) that ``configure`` recorded for this process tree, if the environment still holds it."""
    source, _, name = os.environ.get(MARK, "").partition(":")
    p = next((p for p in POLICIES if p.name == name), None)
    return (source, p) if p is not None and dict(p.env) == _current_env() else None


def configure(policy_name: str | None = None, measure_if_missing: bool = True, model: str = "smollm2-135m",
              tolerance: float = 0.10) -> OpenMPChoice:
    """Set the OpenMP environment for this process and its children; call before torch is imported.

    Order: an explicit ``policy_name``; a choice inherited from a configured parent process;
    ``ADAPTIVE_PRUNING_OMP``; the user's own ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``; the cached
    measurement of this machine; a fresh measurement (when ``measure_if_missing``: 1-3 minutes, then
    cached); else the reference policy. A measured choice also sets the weight layout for
    ``model_loader.load_model`` (``ADAPTIVE_PRUNING_WEIGHT_LAYOUT``, unless the user set it).
    """
    if "torch" in sys.modules:
        log.debug("torch is already imported: the OpenMP wait policy in effect cannot change now")
        return active()
    if policy_name is None and _marked() is not None:
        return active()
    name = policy_name or os.environ.get(OVERRIDE, "auto")
    if name != "auto":
        return _apply(policy(name), "override")
    if _current_env():
        return active()
    cached = load_cached() or (measure_and_cache(model, tolerance) if measure_if_missing else None)
    if cached is None:
        return _apply(REFERENCE, "default")
    os.environ.setdefault(WEIGHT_LAYOUT_ENV, cached.layout)   # read by model_loader.load_model
    return _apply(policy(cached.policy), "measured")


def measure_and_cache(model: str = "smollm2-135m", tolerance: float = 0.10) -> OpenMPChoice | None:
    """Run the probes, decide and write the cache; None (and a warning) when a probe fails."""
    key = machine_key()
    log.info("choosing the OpenMP wait policy for this machine by measurement (once, cached in %s)", cache_path(key))
    started = time.time()
    try:
        probes = measure(model)
        name, idle, busy = decide(probes, tolerance)
        gain = measure_layout(policy(name), idle, model)
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as err:
        log.warning("OpenMP probe failed, using '%s' without a measurement: %s", REFERENCE.name, err)
        return None
    layout = "column" if gain >= 1 + LAYOUT_MARGIN else "row"
    choice = OpenMPChoice(name, idle, busy, "measured", key, probes,
                          time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), layout, gain)
    atomic_write_text(cache_path(key), json.dumps(choice.to_dict(), indent=1))
    log.info("OpenMP wait policy '%s' (threads: %d idle, %d busy), %s-major weights (x%.2f), measured in %.0f s",
             name, idle, busy, layout, gain, time.time() - started)
    return choice


def active() -> OpenMPChoice:
    """The choice the current environment holds (what libgomp read, if torch was imported after it).

    Only the measured choice carries a thread rule; a policy set by hand leaves the thread count to
    the caller (threads None), as before the governor existed.
    """
    key = machine_key()
    marked = _marked()
    if marked is not None:
        source, p = marked
    else:
        env = _current_env()
        p = next((p for p in POLICIES if dict(p.env) == env), None) or WaitPolicy(
            ",".join(f"{k}={v}" for k, v in sorted(env.items())), tuple(sorted(env.items())), "the user's own")
        source = "environment" if env else "unset"
    cached = load_cached(key) if source == "measured" else None
    layout = os.environ.get(WEIGHT_LAYOUT_ENV, "row")
    if cached is None or cached.policy != p.name:
        return OpenMPChoice(p.name, None, None, source, key, layout=layout)
    return OpenMPChoice(**{**asdict(cached), "probes": cached.probes, "source": source, "layout": layout})
