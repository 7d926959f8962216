"""Schema validation of metrics.json: its top-level fields, and record fields against records.py.

``validate_metrics`` lists every problem it finds (empty when the file is valid) instead of raising,
so a partial or old run can still be reported with its problems named.
"""
from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass

from environments.records import RUN_KINDS, SCHEMA_VERSION, EpisodeRecord, PromptResult

MAX_PROBLEMS = 25
TASK_NUMBERS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")
SPEED_NUMBERS = ("prefill_tokens_per_s", "decode_tokens_per_s", "latency_s", "peak_rss_mb", "energy_j", "controller_s")


def validate_metrics(d: object) -> list[str]:
    """Problems with a metrics.json object (empty when valid); record fields are checked against records.py."""
    if not isinstance(d, Mapping):
        return [f"metrics must be an object, got {type(d).__name__}"]
    problems: list[str] = []
    version = d.get("schema_version")
    if version is None:
        problems.append("schema_version: missing")
    elif version != SCHEMA_VERSION:
        problems.append(f"schema_version: {version!r} is not supported (this code reads {SCHEMA_VERSION})")
    kind = d.get("kind")
    if kind not in RUN_KINDS:
        problems.append(f"kind: {kind!r} is not one of {', '.join(RUN_KINDS)}")
    _expect(d, "partial", bool, problems, required=True)
    if d.get("partial_reason") is not None:
        _expect(d, "partial_reason", str, problems)
    for key in ("provenance", "config", "summary"):
        _expect(d, key, Mapping, problems, required=key != "summary")
    _check_value(d.get("action_space", []), list[str], "action_space", problems)
    required = {"train": "episodes", "test": "offline_test" if "offline_test" in d else "prompts",
                "eval": "evaluation", "baselines": "baselines"}.get(kind)
    if required and required not in d:
        problems.append(f"{required}: missing (a {kind} run records it, empty while nothing is done yet)")
    _check_value(d.get("episodes", []), list[EpisodeRecord], "episodes", problems)
    _check_value(d.get("prompts", []), list[PromptResult], "prompts", problems)
    _check_ablations(d.get("ablations", {}), problems)
    _check_evaluation(d.get("evaluation", {"models": {}}), problems)
    _check_baselines(d.get("baselines", []), problems)
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
    return problems


def _expect(d: Mapping, key: str, typ: type, problems: list[str], required: bool = False) -> None:
    if key not in d:
        if required:
            problems.append(f"{key}: missing")
    elif not isinstance(d[key], typ) or (typ is not bool and isinstance(d[key], bool)):
        problems.append(f"{key}: expected {typ.__name__}, got {type(d[key]).__name__}")


def _check_value(value: object, hint: object, path: str, problems: list[str]) -> None:
    """Check a JSON value against a records.py type hint (scalars, X | None, list[X], dict[str, X], records)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        trial: list[str] = []
        for option in options:
            trial = []
            _check_value(value, option, path, trial)
            if not trial:
                return
        problems.extend(trial if len(options) == 1 else [f"{path}: {_type_name(value)} matches none of {hint}"])
    elif is_dataclass(hint):
        _check_record(value, hint, path, problems)
    elif origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_type_name(value)}")
            return
        for i, item in enumerate(value):
            _check_value(item, args[0], f"{path}[{i}]", problems)
    elif origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {_type_name(value)}")
            return
        for key, item in value.items():
            _check_value(item, args[1], f"{path}.{key}", problems)
    elif not _is_instance(value, hint):
        problems.append(f"{path}: expected {getattr(hint, '__name__', hint)}, got {_type_name(value)}")


def _is_instance(value: object, hint: object) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_record(value: object, cls: type, path: str, problems: list[str]) -> None:
    if not isinstance(value, Mapping):
        problems.append(f"{path}: expected a {cls.__name__} object, got {_type_name(value)}")
        return
    hints = _record_hints(cls)
    for f in fields(cls):
        if f.name in value:
            _check_value(value[f.name], hints[f.name], f"{path}.{f.name}", problems)
        elif f.default is MISSING and f.default_factory is MISSING:
            problems.append(f"{path}.{f.name}: missing")


@functools.lru_cache(maxsize=None)
def _record_hints(cls: type) -> dict[str, object]:
    """Resolved field types of a record class (memoised: thousands of records share a few classes)."""
    return typing.get_type_hints(cls)


def _check_ablations(ablations: object, problems: list[str]) -> None:
    if not isinstance(ablations, Mapping):
        problems.append(f"ablations: expected an object, got {_type_name(ablations)}")
        return
    for name, value in ablations.items():
        _check_value(value, list[PromptResult], f"ablations.{name}", problems)


def _check_evaluation(evaluation: object, problems: list[str]) -> None:
    models = evaluation.get("models") if isinstance(evaluation, Mapping) else None
    if not isinstance(models, Mapping):
        problems.append("evaluation.models: expected an object of model label -> results")
        return
    for label, m in models.items():
        path = f"evaluation.models.{label}"
        if not isinstance(m, Mapping):
            problems.append(f"{path}: expected an object, got {_type_name(m)}")
            continue
        _check_numbers(m.get("wikitext") or {}, ("ppl", "tokens_scored"), f"{path}.wikitext", problems)
        tasks = m.get("tasks", {})
        if not isinstance(tasks, Mapping):
            problems.append(f"{path}.tasks: expected an object, got {_type_name(tasks)}")
            tasks = {}
        for task, row in tasks.items():
            _check_numbers(row, TASK_NUMBERS, f"{path}.tasks.{task}", problems)
        _check_numbers(m.get("speed", {}), SPEED_NUMBERS, f"{path}.speed", problems)
        _check_value(m.get("actions", {}), dict[str, int], f"{path}.actions", problems)


def _check_numbers(row: object, keys: Sequence[str], path: str, problems: list[str]) -> None:
    """The named fields, where present, are numbers or null; other fields are the producer's business."""
    if not isinstance(row, Mapping):
        problems.append(f"{path}: expected an object, got {_type_name(row)}")
        return
    for key in keys:
        if key in row:
            _check_value(row[key], float | None, f"{path}.{key}", problems)


def _check_baselines(rows: object, problems: list[str]) -> None:
    if not isinstance(rows, list):
        problems.append(f"baselines: expected a list, got {_type_name(rows)}")
        return
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or not isinstance(row.get("method"), str):
            problems.append(f"baselines[{i}]: expected an object with a 'method' name")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__
