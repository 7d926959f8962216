"""Project paths, crash-safe file writes and strict JSON.

Why one atomic write: checkpoints, metrics.json, the importance-score cache and lm-eval's derived
task files are all read by later runs; a kill mid-write must leave the old file or the new one,
never half of one.

Why strict JSON: Python writes NaN / Infinity by default, which strict parsers (JavaScript, jq, Go, most
databases) reject. Every results file goes through ``strict_json``: a non-finite number becomes ``null``
(the measurement did not exist), and ``allow_nan=False`` makes any other path to NaN an error, not a file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# .NAME.pid<writer>-<random>.tmp: the writer's pid tells an orphan (writer gone, e.g. SIGKILL) from a write in flight
TEMP_NAME = re.compile(r"^\..+\.pid(\d+)-[A-Za-z0-9_]+\.tmp$")
log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """Call ``write(fh)`` on a temp file in the same folder, fsync, then os.replace it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.pid{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)   # mkstemp makes 0600; reports and caches are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")), mode=mode)


def _raise(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; convert it before writing")


def jsonable(obj: Any, default: Callable[[object], object] = _raise) -> Any:
    """``obj`` as plain JSON values: non-finite floats -> None; numpy/torch values (``tolist``), paths and
    dataclasses converted; anything else through ``default`` (which raises unless given)."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k if isinstance(k, str) else str(k): jsonable(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, default) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj), default)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):            # numpy scalars and arrays, torch tensors
        return jsonable(obj.tolist(), default)
    return jsonable(default(obj), default)


def strict_json(obj: Any, default: Callable[[object], object] = _raise, **dumps) -> str:
    """``json.dumps`` of ``jsonable(obj)`` with ``allow_nan=False``: parses with any strict JSON reader."""
    return json.dumps(jsonable(obj, default), allow_nan=False, **dumps)
def clean_orphaned_temp_files(folder: Path) -> list[Path]:
    """Remove the temp files of atomic writes whose process is gone (a SIGKILL mid-write leaves one behind);
    a write still in flight in another process is left alone. Returns what was removed."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = TEMP_NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d orphaned temp file(s) of a killed run in %s", len(removed), folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return pid != 0
