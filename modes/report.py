"""--mode report: re-render one run folder, or compare several."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from reporting import render as reporting
from reporting.schema import validate_metrics

log = logging.getLogger(__name__)


def run_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    missing = [d for d in run_dirs if not (Path(d) / "metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no metrics.json in {', '.join(map(str, missing))}: pass a run folder under reports/")
    if len(run_dirs) == 1:
        path = reporting.render(Path(run_dirs[0]))
        metrics_file = Path(run_dirs[0]) / "metrics.json"
        metrics = json.loads(metrics_file.read_text())
        problems = validate_metrics(metrics)
        if problems:
            more = f" (and {len(problems) - 1} more, listed in {path})" if len(problems) > 1 else f" (see {path})"
            raise ValueError(f"{metrics_file} is malformed: {problems[0]}{more}; regenerate the run or fix the file")
        print(reporting.console_summary(metrics))
        print(f"report: {path}")
        return path
    out = out_dir or Path(run_dirs[0]).parent / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    path = reporting.compare([Path(d) for d in run_dirs], out)
    print(f"comparison: {path}")
    return path
