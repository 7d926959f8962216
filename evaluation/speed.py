"""Speed and resource figures for one evaluated model: a fixed generation probe and a memory monitor.

Why a fixed probe: tokens/s from a benchmark run depend on its request lengths and batching, so
every model (dense, static, policy) is also timed on the same prompt and the same number of new
tokens, by the protocol of ``runtime.timing`` (greedy, EOS ignored, one warm-up, medians, decode
as the median step) under the execution governor's setting. Prefill and decode are timed apart
because pruning changes them differently (decode is memory-bound). These are absolute figures per
model, timed one model after another; speedup claims belong to the interleaved timings of test mode.
"""
from __future__ import annotations

import statistics
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import psutil
import torch

from evaluation.routes import Route
from runtime.generation import generate
from runtime.governor import ExecutionGovernor
from runtime.timing import RunTiming, TimingSession
from machine.energy import EnergyMeter

PROBE_TEXT = ("The committee met on a grey morning to review the harbour plans. Engineers described the "
              "new sea wall, the costs of dredging the channel, and the schedule for the works, while "
              "residents asked how the changes would affect fishing, traffic and the old market square. ")


@dataclass
class SpeedResult:
    prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    latency_s: float             # one probe request: median prefill + (new_tokens - 1) x median decode step
    controller_s: float | None   # policy only: median decision time per probe request
    runtime: str | None = None   # the runtime it was timed under (runtime.governor)


@dataclass
class ResourceUsage:
    peak_rss_mb: float
    cuda_peak_mb: float | None
    energy_j: float | None       # None where no energy counter is available
    energy_source: str           # nvml_energy | nvml_power | rapl | unavailable


def probe_prompt(tokenizer, n_tokens: int) -> torch.Tensor:
    """The fixed probe prompt, tiled and cut to exactly `n_tokens` tokens."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids.extend(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    return torch.tensor([ids[:n_tokens]], dtype=torch.long)


def probe_speed(model: torch.nn.Module, tokenizer, route: Route, prompt_tokens: int = 512,
                new_tokens: int = 32, repeats: int = 3, governor: ExecutionGovernor | None = None) -> SpeedResult:
    """Median timings over `repeats` after one warm-up; the policy decides anew for every repeat.

    Generation goes through `generation.generate` with the route's engine, so a kv_cache action
    really shortens the cache after prefill (only for prompts of at least the engine's
    ``kv_min_tokens``, 256 by default: hence the 512-token default prompt).
    """
    prompt = probe_prompt(tokenizer, prompt_tokens)
    text = tokenizer.decode(prompt[0])
    controller: list[float] = []
    governor = governor or ExecutionGovernor(device=next(model.parameters()).device)
    decoder = governor.decoder(model, route.engine)

    def run() -> RunTiming:
        before = route.controller_s
        with route.request(text) if route.per_request else nullcontext():
            timing = RunTiming.of(generate(model, prompt, new_tokens, engine=route.engine, decoder=decoder))
        controller.append(route.controller_s - before)
        return timing

    session = TimingSession(governor.govern(explore=False))
    timings = session.repeat(route.label, run, repeats)
    return SpeedResult(prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
                       prefill_tokens_per_s=prompt_tokens / timings.prefill_s,
                       decode_tokens_per_s=1.0 / timings.decode_per_token_s, latency_s=timings.latency(new_tokens),
                       controller_s=statistics.median(controller[1:]) if route.per_request else None,
                       runtime=session.runtime)


class ResourceMonitor:
    """Peak RSS (sampled in a thread, so each model gets its own peak), CUDA peak memory and energy."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device = device
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._energy = EnergyMeter()
        self.usage: ResourceUsage | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "ResourceMonitor":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        self._energy.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._energy.__exit__(*exc)
        self._stop.set()
        self._thread.join()
        self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        cuda = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        self.usage = ResourceUsage(peak_rss_mb=self._peak_rss / 2**20, cuda_peak_mb=cuda,
                                   energy_j=self._energy.joules, energy_source=self._energy.source)
