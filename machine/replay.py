"""Telemetry replayed from an earlier run, so training and testing can be reproduced exactly."""
from __future__ import annotations

import json
from pathlib import Path


class RecordedHardware:
    """A telemetry vector replayed from an earlier run (for exactly reproducible training)."""
    power_plugged = None

    def __init__(self, vector: list[float]):
        self.vector = vector


def load_trace(path: str, n_hardware: int | None = None) -> list[list[float]]:
    """The hardware vectors a train run recorded; `n_hardware`: the slots this run's state has (checked)."""
    try:
        metrics = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"--telemetry-trace {path} cannot be read ({err.strerror})") from err
    except ValueError as err:
        raise ValueError(f"--telemetry-trace {path} is not valid JSON ({err}): pass a train run's metrics.json") from err
    if not isinstance(metrics, dict):
        raise ValueError(f"--telemetry-trace {path} is not a run's metrics.json (a JSON object)")
    trace = [ep["hardware"] for ep in metrics.get("episodes", []) if ep.get("hardware")]
    if not trace:
        raise ValueError(f"--telemetry-trace {path} holds no recorded hardware states: pass a train run's metrics.json")
    if n_hardware is not None and len(trace[0]) != n_hardware:
        raise ValueError(f"--telemetry-trace {path} records {len(trace[0])} hardware slots, this state has {n_hardware}: "
                         "replay a trace recorded with the same --state-features")
    return trace
