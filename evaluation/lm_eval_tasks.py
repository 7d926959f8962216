"""lm-eval tasks on local data: derived task YAMLs that `include:` the built-in ones.

Why: lm-eval reads every data set from the Hugging Face Hub. A derived YAML keeps the built-in
task (prompts, metrics, `!function` hooks, version) and swaps only where the documents come from
(`dataset_path: json|arrow`, `dataset_kwargs.data_files`), so scores stay comparable with the
stock task. Files whose schema differs from the Hub copy lm-eval expects are converted once into
the project cache (ARC's nested OpenCompass layout, BoolQ's "true"/"false" labels, WikiText's raw
file into lm-eval's 62 documents). Derived YAMLs are written at run time into the cache too.

Default mapping: when the Hub is offline and a task has no ``--task-data``, the known tasks read
the shared data folder (``$ADAPTIVE_PRUNING_DATA`` or ``../shared/data``).
"""
from __future__ import annotations

from common import hub  # noqa: F401  (HF offline flags before `lm_eval`/`datasets` load)

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import yaml

from common.data import data_root
from common.files import atomic_write_text, strict_json
from evaluation.routes import EvaluationError

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1   # bump when a converter's output changes, so cached files are rebuilt
TASK_DATA_FLAG = "--task-data TASK=PATH"


def builtin_tasks_dir() -> Path:
    import lm_eval
    return Path(lm_eval.__file__).resolve().parent / "tasks"


# ---------------------------------------------------------------- converters (source file -> HF-schema jsonl)

def _read_jsonl(path: Path) -> Iterable[dict]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def arc_record(record: dict) -> dict:
    """OpenCompass/original ARC ({question: {stem, choices: [{text, label}]}}) -> HF allenai/ai2_arc."""
    question = record["question"]
    if isinstance(question, str):   # already in the HF layout
        return record
    choices = question["choices"]
    return {"id": record.get("id"), "question": question["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": record["answerKey"]}


def boolq_record(record: dict) -> dict:
    """SuperGLUE BoolQ with label "true"/"false", bool or 0/1 (or google/boolq's `answer`) -> label 0/1."""
    value = record["label"] if "label" in record else record["answer"]
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ValueError(f"BoolQ label {value!r} is not true/false")
        value = value.lower() == "true"
    return {"question": record["question"], "passage": record["passage"], "idx": record.get("idx"),
            "label": int(bool(value))}


def wikitext_documents(raw: str) -> list[dict]:
    """The raw test file split into articles exactly as EleutherAI/wikitext_document_level does (62 pages)."""
    pages, current = [], []
    lines = raw.split("\n")
    for line in lines:
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append({"page": page})
            current = []
        current.append(line)
    pages.append({"page": "\n".join(current)})
    return pages


def _convert_records(fn: Callable[[dict], dict]) -> Callable[[Path], list[dict]]:
    return lambda path: [fn(r) for r in _read_jsonl(path)]


# ---------------------------------------------------------------- the known tasks

@dataclass(frozen=True)
class LocalTask:
    """How one built-in task reads local files."""
    name: str
    builtin_yaml: str                                     # relative to lm_eval/tasks
    split: str                                            # the split the task evaluates
    default_relpath: str                                  # under the shared data folder
    convert: Callable[[Path], list[dict]] | None = None   # None: the file already has the Hub schema


KNOWN_TASKS: dict[str, LocalTask] = {t.name: t for t in (
    LocalTask("arc_easy", "arc/arc_easy.yaml", "test", "ai2_arc/ARC-Easy-Test.jsonl", _convert_records(arc_record)),
    LocalTask("arc_challenge", "arc/arc_challenge.yaml", "test", "ai2_arc/ARC-Challenge-Test.jsonl",
              _convert_records(arc_record)),
    LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "validation", "hellaswag/validation"),
    LocalTask("winogrande", "winogrande/default.yaml", "validation", "winogrande/dev.jsonl"),
    LocalTask("lambada_openai", "lambada/lambada_openai.yaml", "test", "lambada_openai/lambada_test.jsonl"),
    LocalTask("boolq", "super_glue/boolq/default.yaml", "validation", "boolq/val.jsonl",
              _convert_records(boolq_record)),
    LocalTask("wikitext", "wikitext/wikitext.yaml", "test", "wikitext-2-raw-v1/wiki.test.raw",
              lambda path: wikitext_documents(path.read_text(encoding="utf-8"))),
)}


# ---------------------------------------------------------------- plan: which tasks read what

@dataclass
class TaskPlan:
    """The resolved task list: which read local files through derived YAMLs, which read the Hub."""
    tasks: list[str]
    yaml_dir: Path | None                                    # derived YAMLs (TaskManager include_path)
    data: dict[str, str] = field(default_factory=dict)       # task -> local file used, or "hub"

    @property
    def needs_builtin_index(self) -> bool:
        return any(source == "hub" for source in self.data.values())

    def task_manager(self):
        """Only the derived YAMLs when every task is local (~0 s), else the full built-in index too (~8 s)."""
        from lm_eval.tasks import TaskManager
        return TaskManager(include_path=str(self.yaml_dir) if self.yaml_dir else None,
                           include_defaults=self.needs_builtin_index)


def parse_task_data(items: Iterable[str]) -> dict[str, str]:
    """['arc_easy=/path/x.jsonl', ...] -> {'arc_easy': '/path/x.jsonl'}."""
    mapping = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task.strip() or not path.strip():
            raise EvaluationError(f"{TASK_DATA_FLAG}: '{item}' is not TASK=PATH")
        mapping[task.strip()] = path.strip()
    return mapping


def prepare_tasks(tasks: Iterable[str], task_data: Mapping[str, str] | None = None, *,
                  online: bool | None = None, cache: Path | None = None) -> TaskPlan:
    """Decide each task's source, convert local files where needed and write the derived YAMLs."""
    tasks = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    task_data = dict(task_data or {})
    online = (not hub.is_offline()) if online is None else online
    cache = cache or hub.cache_dir()
    stray = sorted(set(task_data) - set(tasks))
    if stray:
        raise EvaluationError(f"{TASK_DATA_FLAG} names {', '.join(stray)}, which --eval-tasks does not list")

    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    for task in unknown:
        _check_mentioned(task)
    for task in tasks:
        if not online and task not in task_data and task not in KNOWN_TASKS:
            raise EvaluationError(
                f"lm-eval task '{task}' reads its data set from the Hugging Face Hub, which is unreachable: "
                f"pass --task-data {task}=PATH with a local copy")
    builtin_index = _builtin_index() if unknown else {}
    for task in unknown:
        if task not in builtin_index:
            _unknown_task(task, builtin_index)

    derived: dict[str, dict] = {}
    sources: dict[str, str] = {}
    for task in tasks:
        path = task_data.get(task)
        if path is None and not online:
            path = str(data_root() / KNOWN_TASKS[task].default_relpath)
        if path is None:
            sources[task] = "hub"
            continue
        derived[task] = _derived_config(task, Path(path).expanduser(), builtin_index, cache)
        sources[task] = str(Path(path).expanduser().resolve())

    yaml_dir = _write_yamls(derived, cache) if derived else None
    return TaskPlan(tasks=tasks, yaml_dir=yaml_dir, data=sources)


def _unknown_task(task: str, names: Iterable[str]):
    close = difflib.get_close_matches(task, list(names), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise EvaluationError(f"unknown lm-eval task '{task}' in --eval-tasks{hint}")


def _check_mentioned(task: str) -> None:
    """Fail fast (~0.3 s instead of the ~8 s index) on a name no built-in YAML even mentions."""
    files = list(builtin_tasks_dir().rglob("*.yaml"))
    if not any(task in path.read_text(encoding="utf-8", errors="ignore") for path in files):
        _unknown_task(task, sorted({path.stem for path in files} | set(KNOWN_TASKS)))


def _builtin_index() -> dict[str, Path | None]:
    """Every built-in task, group and tag name -> its YAML for single tasks, None for groups and tags.

    Parses all built-in YAMLs (~8 s), so only when a task outside KNOWN_TASKS is asked for.
    """
    from lm_eval.tasks import TaskManager
    manager = TaskManager()
    leaves = set(manager.all_subtasks)
    return {name: entry.yaml_path if name in leaves else None for name, entry in manager.task_index.items()}


def _derived_config(task: str, path: Path, builtin_index: Mapping[str, Path | None], cache: Path) -> dict:
    """The YAML body for one task: the built-in config, reading `path` for the evaluated split."""
    if not path.exists():
        raise EvaluationError(
            f"local data for lm-eval task '{task}' not found at {path}: pass --task-data {task}=PATH "
            "(or set ADAPTIVE_PRUNING_DATA to the shared data folder)")
    if not path.is_dir() and (not path.is_file() or path.stat().st_size == 0):
        raise EvaluationError(f"--task-data {task}={path}: the file is empty or not a regular file: pass a "
                              f"file with the {task} records")
    known = KNOWN_TASKS.get(task)
    if known is not None:
        include, split = builtin_tasks_dir() / known.builtin_yaml, known.split
    elif builtin_index[task] is None:
        raise EvaluationError(f"--task-data {task}=PATH: '{task}' is an lm-eval group or tag; give local data "
                              "for each of its tasks by name instead")
    else:
        include = Path(builtin_index[task])
        split = _evaluated_split(include)
    if known is not None and known.convert is not None:
        path = _converted(task, path, known.convert, cache)
    loader, files = _loader_for(task, path)
    config = {"include": str(include), "task": task, "dataset_path": loader, "dataset_name": None,
              "dataset_kwargs": {"data_files": {split: files}},
              "training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    config["validation_split" if split == "validation" else "test_split"] = split
    return config


def _evaluated_split(include: Path) -> str:
    """The split lm-eval scores for a built-in task: test when it has one, else validation."""
    from lm_eval.tasks._yaml_loader import load_yaml
    cfg = load_yaml(include, resolve_func=False)
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise EvaluationError(f"lm-eval task YAML {include} has no test or validation split to read local data into")
    return split


def _loader_for(task: str, path: Path) -> tuple[str, list[str]]:
    """`datasets` builder name and files for a local path (a `save_to_disk` folder reads its arrow files)."""
    if path.is_dir():
        # The files state.json lists, not every *.arrow: `datasets` may leave cache-*.arrow files beside them.
        state = path / "state.json"
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            names = [p.name for p in path.glob("data-*.arrow")]
        arrows = sorted(str(path / n) for n in names if (path / n).is_file())
        if not arrows:
            raise EvaluationError(f"--task-data {task}={path}: the folder holds no .arrow files "
                                  "(expected a datasets save_to_disk folder)")
        return "arrow", arrows
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
    if path.suffix not in builders:
        raise EvaluationError(f"--task-data {task}={path}: not a .jsonl/.json/.csv/.parquet/.arrow file "
                              "or a save_to_disk folder")
    return builders[path.suffix], [str(path.resolve())]


def _converted(task: str, path: Path, convert: Callable[[Path], list[dict]], cache: Path) -> Path:
    """Convert once per source content; the file name carries the source hash and converter version."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    out = cache / "lm_eval_data" / f"{task}-{digest}-v{CONVERTER_VERSION}.jsonl"
    if out.is_file():
        return out
    try:
        records = convert(path)
    except (KeyError, ValueError, TypeError) as err:
        raise EvaluationError(f"--task-data {task}={path}: does not look like {task} data ({err!r})") from err
    if not records:
        raise EvaluationError(f"--task-data {task}={path}: the file is empty (no {task} records)")
    atomic_write_text(out, "".join(strict_json(record, ensure_ascii=False) + "\n" for record in records))
    log.info("converted %s for %s -> %s (%d records)", path, task, out, len(records))
    return out


def _write_yamls(derived: Mapping[str, dict], cache: Path) -> Path:
    """One folder per distinct mapping, so a TaskManager indexes exactly this run's tasks."""
    key = hashlib.sha256(json.dumps(derived, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / "lm_eval_tasks" / key
    folder.mkdir(parents=True, exist_ok=True)
    for task, config in derived.items():
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return folder
