"""The server's Prometheus metrics, in a registry of its own (one per server, no process-global state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
_DECISION = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


class ServerMetrics:
    """Queue, batch, latency histograms, the actions taken and SLO attainment."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("serve_queue_length", "requests waiting for a batch slot", registry=r)
        self.running = Gauge("serve_running_batch", "rows decoded in the last step", registry=r)
        self.ttft = Histogram("serve_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("serve_time_per_output_token_seconds", "mean time per token after the first",
                              buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("serve_e2e_request_latency_seconds", "arrival to last token", buckets=_LATENCY,
                             registry=r)
        self.decision = Histogram("serve_decision_seconds", "policy decision time per step", buckets=_DECISION,
                                  registry=r)
        self.actions = Counter("serve_action_steps", "decode steps and prefills run under each pruning action",
                               ["action"], registry=r)
        self.requests = Counter("serve_requests", "finished requests by SLO outcome", ["slo"], registry=r)
        self.rejected = Counter("serve_rejected_requests", "requests refused before queueing", ["reason"],
                                registry=r)
        self.attainment = Gauge("serve_slo_attainment", "share of finished requests that met the SLO", registry=r)
        self._met = self._finished = 0

    def finished(self, ttft_s: float, tpot_s: float | None, e2e_s: float, slo_met: bool) -> None:
        self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        self.e2e.observe(e2e_s)
        self.requests.labels(slo="met" if slo_met else "missed").inc()
        self._finished += 1
        self._met += slo_met
        self.attainment.set(self._met / self._finished)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
