"""A soak of the live server: a server process under open-loop load for minutes, its memory sampled throughout.

Why a separate process: its RSS is then the server's alone (not the load client's), and it is stopped the way an
operator stops it (SIGTERM, which drains). Why server-side counters too: the client sees what it got back; the
Prometheus counters say what the server finished and refused, and the two must agree for no accepted request to
have vanished.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.load import Arrival, RequestRecord, run_load

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


@dataclass(frozen=True)
class RssSample:
    at_s: float             # seconds after the load started (negative: before it)
    rss_mib: float


class RssSampler:
    """Samples a process's resident set size every ``interval_s`` seconds on a thread of its own."""

    def __init__(self, pid: int, interval_s: float) -> None:
        import psutil

        self.process, self.interval_s = psutil.Process(pid), interval_s
        self.samples: list[RssSample] = []
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()                          # the last reading, after the load

    def sample(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            self.samples.append(RssSample(time.perf_counter() - self.start, self.process.memory_info().rss / MIB))

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return


def rss_summary(samples: Sequence[RssSample], flat_share: float) -> dict:
    """Start RSS, p50 over the second half, max, and the least-squares slope over the second half (MiB/min).

    Flat: the fitted line grows by less than ``flat_share`` of the start RSS over the second half (a criterion
    fixed before the run: warm-up growth in the first half is allowed, steady growth later is a leak).
    """
    if len(samples) < 4:
        raise ValueError(f"the soak took {len(samples)} RSS samples; lower the sample interval or run longer")
    end = samples[-1].at_s
    second = [s for s in samples if s.at_s >= end / 2]
    slope, _ = statistics.linear_regression([s.at_s / 60 for s in second], [s.rss_mib for s in second])
    growth = slope * (end / 2) / 60
    start = samples[0].rss_mib
    return {"samples": len(samples), "start_mib": start, "p50_second_half_mib": statistics.median(s.rss_mib for s in second),
            "max_mib": max(s.rss_mib for s in samples), "slope_second_half_mib_per_min": slope,
            "growth_second_half_mib": growth, "flat_criterion": f"growth over the second half < {flat_share:.0%} of "
            "the start RSS", "flat": bool(growth < flat_share * start)}


def accounting(records: Sequence[RequestRecord], output_tokens: Sequence[int], server: dict[str, float]) -> dict:
    """What the client got against what the server says it did; ``adds_up`` when no accepted request vanished.

    sent = answered (200, every token) + errors (an HTTP error status after acceptance) + rejected (429, 503 while
    draining) + lost (a connection failure, a timeout or a cut-off stream), and lost must be 0; the server's finished
    requests equal the client's answered ones and its queue-full refusals the client's 429s.
    """
    answered = sum(r.status == 200 and r.output_tokens == n for r, n in zip(records, output_tokens))
    rejected = sum(r.status in (429, 503) for r in records)
    errors = sum(r.status not in (0, 200, 429, 503) for r in records)
    lost = len(records) - answered - rejected - errors
    finished = server.get('serve_requests_total{slo="met"}', 0) + server.get('serve_requests_total{slo="missed"}', 0)
    refused = server.get('serve_rejected_requests_total{reason="queue_full"}', 0)
    return {"sent": len(records), "accepted": len(records) - rejected, "answered": answered,
            "rejected_429": sum(r.status == 429 for r in records), "errors": errors, "lost": lost,
            "server_finished": int(finished), "server_rejected": int(refused),
            "adds_up": bool(lost == 0 and finished == answered and refused == sum(r.status == 429 for r in records))}


def scrape(url: str) -> dict[str, float]:
    """The server's counters, keyed as Prometheus prints them (name{label="value"})."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(serve_args: Sequence[str], start_timeout_s: float = 1800.0):
    """``adaptive_pruning.py --mode serve`` on a free port of 127.0.0.1; yields (process, url); SIGTERM at the end.

    The server's log goes to a temporary file (a pipe nobody reads would fill and stall it); its tail is raised with
    a server that dies or never answers /health.
    """
    import httpx

    port = free_port()
    logfile = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "adaptive_pruning.py"), "--mode", "serve", "--host",
                             "127.0.0.1", "--port", str(port), *serve_args], cwd=ROOT, env=env, stdout=logfile,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def tail() -> str:
        return Path(logfile.name).read_text(errors="replace")[-3000:]
    try:
        deadline = time.time() + start_timeout_s
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the soak's server did not start (exit {proc.poll()}):\n{tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("soak server exited %s; log %s", proc.returncode, logfile.name)
        logfile.close()


def run_soak(serve_args: Sequence[str], model: str, arrivals: Sequence[Arrival], prompts: Sequence[str],
             slo_ttft_ms: float, slo_tpot_ms: float, sample_s: float = 5.0, flat_share: float = 0.02,
             timeout_s: float = 900.0) -> dict:
    """Start the server, sample its RSS while the arrivals play, count what came back, stop it with SIGTERM."""
    with server_process(serve_args) as (proc, url):
        with RssSampler(proc.pid, sample_s) as sampler:
            time.sleep(min(sample_s, 1.0))        # a reading of the idle server before the first request
            started = time.perf_counter()
            records = asyncio.run(run_load(url, model, arrivals, prompts, slo_ttft_ms, slo_tpot_ms, timeout_s))
            load_s = time.perf_counter() - started
        counters = scrape(url)
    origin = started - sampler.start
    samples = [RssSample(s.at_s - origin, s.rss_mib) for s in sampler.samples]
    met = sum(r.slo_met for r in records)
    return {"requests": len(arrivals), "load_s": load_s, "exit_code": proc.returncode,
            "accounting": accounting(records, [a.output_tokens for a in arrivals], counters),
            "slo_attainment": met / max(1, len(records)), "rss": rss_summary(samples, flat_share),
            "rss_samples": [[round(s.at_s, 2), round(s.rss_mib, 2)] for s in samples]}
