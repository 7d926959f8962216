"""Cost of one controller observation: telemetry read + analysis of a ~100-word prompt, per backend.

Why: the observation runs before every generation, so it must stay a small fraction of it
(issue 4 asks < 5 ms median after warm-up). Prompts are distinct real passages (LAMBADA and
BoolQ from the shared data), so the analyzer's cache never hits in the timed loop; the cached
cost and spaCy's batched cost (``analyze_batch``, used to pre-compute a data set) are shown apart.

    PYTHONPATH=. python bench/observation_overhead.py [--prompts 200] [--words 100]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import psutil

from common.data import data_root
from nlp_analyzer import BACKENDS, BackendUnavailable, PromptAnalyzer
from machine.telemetry import TelemetrySampler, snapshot


def real_prompts(n: int, words: int) -> list[str]:
    """Distinct ``words``-word windows of LAMBADA passages and BoolQ passages, interleaved."""
    root = data_root()
    texts = [json.loads(line)["text"] for line in (root / "lambada_openai" / "lambada_test.jsonl").open()]
    texts += [json.loads(line)["passage"] for line in (root / "boolq" / "val.jsonl").open()]
    long_enough = [" ".join(t.split()[:words]) for t in texts if len(t.split()) >= words]
    half = len(long_enough) // 2
    mixed = [t for pair in zip(long_enough[:half], long_enough[half:]) for t in pair]
    if len(mixed) < n:
        raise SystemExit(f"only {len(mixed)} prompts of {words}+ words under {root}")
    return mixed[:n]


def timings_ms(fn: Callable[[int], object], n: int) -> tuple[float, float, float]:
    """Wall-clock median and p95, and CPU-time median, of ``fn(i)`` over i in range(n), in ms.

    CPU time (this thread) is what the call costs; wall time adds waiting for a busy machine.
    """
    wall, cpu = [], []
    for i in range(n):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn(i)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    wall.sort()
    return statistics.median(wall), wall[min(n - 1, round(0.95 * (n - 1)))], statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200, help="timed prompts per backend")
    parser.add_argument("--words", type=int, default=100, help="words per prompt")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    prompts = real_prompts(args.warmup + args.prompts, args.words)
    warm, timed = prompts[: args.warmup], prompts[args.warmup:]
    n = len(timed)

    print(f"machine: {psutil.cpu_count()} logical cores, load average {psutil.getloadavg()[0]:.2f}; "
          f"{n} distinct {args.words}-word prompts after {len(warm)} warm-up")
    with TelemetrySampler(rate_hz=10) as sampler:
        med, p95, _ = timings_ms(lambda i: sampler.latest().vector, n)
        print(f"{'telemetry latest().vector':40s} median {med * 1e3:8.1f} us   p95 {p95 * 1e3:8.1f} us")
        med, p95, _ = timings_ms(lambda i: snapshot().vector, 20)
        print(f"{'telemetry one-off snapshot()':40s} median {med:8.2f} ms   p95 {p95:8.2f} ms")
        idle_cpu0 = sampler.probe.process.cpu_times()
        time.sleep(2.0)
        idle_cpu1 = sampler.probe.process.cpu_times()
        share = (idle_cpu1.user + idle_cpu1.system - idle_cpu0.user - idle_cpu0.system) / 2.0
        print(f"{'sampler thread at 10 Hz':40s} {share * 100:.2f}% of one core")

        print(f"\n{'backend':10s} {'observation, uncached (wall)':>34s} {'CPU median':>11s} {'cached':>10s} "
              f"{'batched/prompt':>15s}")
        variants = [(b, b, {}) for b in BACKENDS]
        variants.insert(1, ("spacy+ner", "spacy", {"spacy_ner": True}))   # the full pipeline, for comparison
        variants.insert(0, ("auto", "auto", {}))       # the default: the first backend within the 5 ms budget
        for label, backend, options in variants:
            try:
                analyzer = PromptAnalyzer(backend, **options)
            except BackendUnavailable as err:
                print(f"{label:9s} unavailable: {err}")
                continue
            if backend == "auto":
                probes = ", ".join(f"{name} {ms:.2f} ms" for name, ms in analyzer.probe_ms.items())
                print(f"auto: start-up probe {probes} -> {analyzer.backend}")
                label, backend = f"auto={analyzer.backend}", analyzer.backend
            analyzer.analyze_batch(warm)

            def observe(i: int) -> None:
                sampler.latest().vector
                analyzer.analyze(timed[i]).vector

            med, p95, cpu = timings_ms(observe, n)
            cached_med, _, _ = timings_ms(observe, n)
            batch_analyzer = PromptAnalyzer(backend, cache_size=0, **options)
            t0 = time.perf_counter()
            batch_analyzer.analyze_batch(timed)
            batched = (time.perf_counter() - t0) * 1e3 / n
            print(f"{label:10s} median {med:7.2f} ms  p95 {p95:7.2f} ms {cpu:8.2f} ms {cached_med * 1e3:7.1f} us "
                  f"{batched:12.2f} ms")


if __name__ == "__main__":
    main()
