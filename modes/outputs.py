"""What every mode writes: the metrics.json skeleton, the rendered report, reused latency tables."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from common.config import RunConfig
from environments.latency_table import LatencyTable
from environments.latency_calibration import load_failures, table_verification
from environments.records import SCHEMA_VERSION
from reporting import render as reporting

log = logging.getLogger(__name__)


def metrics_skeleton(kind: str, cfg: RunConfig, prov: dict, action_space: list[str], **parts) -> dict:
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "partial": False, "partial_reason": None,
            "provenance": prov, "config": cfg.to_dict(),
            "action_space": action_space, **parts}


def finish_run(run_dir, metrics: dict) -> Path:
    run_dir.write_metrics(metrics)
    path = reporting.render(run_dir.path)
    print(reporting.console_summary(metrics))
    print(f"report: {path}")
    return run_dir.path


def load_table(path: str) -> LatencyTable:
    """A train run's latency_table.json, or any run's metrics.json (its table), for reproducible rewards.

    A test run's table lets a second policy (an ablation) be tested on exactly the same timings.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--latency-table {path} not found: pass the latency_table.json or "
                                "metrics.json of an earlier run")
    try:
        data = json.loads(file.read_text())
        return LatencyTable.from_dict(data.get("latency_table", data))
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"--latency-table {path} is not a latency table ({err})") from err


def offline_record(data, arms, seeds: list[int] | None = None, histories=None, checkpoints=None) -> dict:
    """The offline block of metrics.json: calibrations (tables + telemetry), their load checks, the
    quality outcomes, the fitted arms and each training seed's reward curve, so a report can be
    rebuilt from metrics.json alone."""
    return {"calibrations": data.calibrations.to_dict(),
            "outcomes": {pid: dataclasses.asdict(o) for pid, o in data.outcomes.items()},
            "prompts": [{"id": p.id, "category": p.category, "source": p.source} for p in data.prompts],
            "features": {pid: dataclasses.asdict(f) for pid, f in data.features.items()},
            "selection": data.selection,
            "arms": arms.to_dict(), "seeds": seeds or [],
            "checkpoints": [str(p) for p in checkpoints or []],
            "seed_rewards": [[e.outcome.reward for e in h if e.outcome] for h in histories or []]}


def load_check(data) -> dict:
    """metrics.json's top-level ``load_verification``: each level's measured slowdowns and the failures."""
    levels = data.calibrations.verification()
    return {"levels": levels, "failures": load_failures(levels), "ok": not load_failures(levels)}


def table_load_check(table: LatencyTable, scenarios) -> dict:
    """The same block for a live run, from its latency table (warned about here: the offline
    calibrator warns as it measures, a live table may come from --latency-table)."""
    levels = table_verification(table, scenarios)
    for line in load_failures(levels):
        log.warning("LOAD FAILED: %s; flagged in metrics.json load_verification", line)
    return {"levels": levels, "failures": load_failures(levels), "ok": not load_failures(levels)}
