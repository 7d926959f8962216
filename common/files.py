"""Project paths and crash-safe file writes.

Why one atomic write: checkpoints, metrics.json, the importance-score cache and lm-eval's derived
task files are all read by later runs; a kill mid-write must leave the old file or the new one,
never half of one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """Call ``write(fh)`` on a temp file in the same folder, fsync, then os.replace it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
