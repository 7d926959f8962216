"""Strict JSON: every results file parses with a strict reader (no NaN / Infinity tokens); a non-finite number is
written as null. The guard below fails when a new ``json.dump(s)`` writes around ``common.files.strict_json``."""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from common.files import strict_json
from reporting.render import RunDir

ROOT = Path(__file__).resolve().parents[1]
# json.dump(s) calls that are not results files, and why they may stay Python's default JSON.
NOT_RESULTS = {
    "pruners/scoring/score_cache.py": "hash input of a cache key",
    "pruners/recovery/healing.py": "hash input of a cache key",
    "evaluation/lm_eval_tasks.py": "hash input of a derived task's file name",
    "reporting/render.py": "set membership and the report's markdown, not a file",
    "environments/outcomes/cache.py": "internal cache read back by this tool (a NaN outcome must round-trip)",
    "environments/outcomes/headroom.py": "internal per-prompt record cache read back by this tool (a run resumes)",
    "environments/precomputed.py": "internal calibration cache read back by this tool",
    "controller/trainer.py": "episode history inside a torch checkpoint, read back by this tool",
    "runtime/openmp.py": "internal per-machine cache of the measured thread policy",
    "serving/step_timing.py": "hash input of the step-time table's cache key",
    "runtime/decode_probe.py": "a child process's answer on stdout, read by its parent",
    "model_loader.py": "strings only (the embedded model's source record)",
    "bench/eval_check.py": "hash input of a cache key",
    "bench/recovery.py": "instruction strings of a derived corpus",
}


def strict_loads(text: str):
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_null_and_numpy_values_plain():
    text = strict_json({"nan": math.nan, "inf": np.float32("inf"), "array": np.array([1.0, np.nan]),
                        "tuple": (1, -math.inf), "path": Path("a/b"), 3: np.int64(4)})
    assert strict_loads(text) == {"nan": None, "inf": None, "array": [1.0, None], "tuple": [1, None],
                                  "path": "a/b", "3": 4}
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        strict_json({"x": object()})


def test_metrics_and_config_files_parse_strictly(tmp_path):
    run = RunDir.create(tmp_path, "train", "tiny")
    metrics = strict_loads(run.write_metrics({"episodes": [], "ppl": float("inf"), "ci": [np.float64("nan"), 1.5]})
                           .read_text())
    assert metrics["ppl"] is None and metrics["ci"] == [None, 1.5]
    config = strict_loads((run.write_config({"budget": math.nan, "path": Path("x")})).read_text())
    assert config == {"budget": None, "path": "x"}


def json_dump_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, passes allow_nan=False) of every json.dump / json.dumps call in a file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("dump", "dumps")
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"):
            strict = any(k.arg == "allow_nan" and isinstance(k.value, ast.Constant) and k.value.value is False
                         for k in node.keywords)
            calls.append((node.lineno, strict))
    return calls


def test_every_json_write_goes_through_strict_json_or_is_a_named_exception():
    files = [p for p in ROOT.rglob("*.py") if not {".venv", "tests", ".cache"} & set(p.relative_to(ROOT).parts)]
    loose = [f"{p.relative_to(ROOT)}:{line}" for p in files for line, strict in json_dump_calls(p)
             if not strict and str(p.relative_to(ROOT)) not in NOT_RESULTS]
    assert not loose, "write results with common.files.strict_json (or name the exception in NOT_RESULTS): " + \
        ", ".join(loose)
    for name in NOT_RESULTS:          # an exception whose call is gone is removed from the list
        assert any(not strict for _, strict in json_dump_calls(ROOT / name)), name
