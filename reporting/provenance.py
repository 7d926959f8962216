"""What ran, on what, from which code: the provenance block of every metrics.json and report.md.

Collected once at the start of a run (``collect``) and stamped with the elapsed wall time at
every metrics write (``stamp_wall_time``), so an interrupted run still says how long it ran.
Every probe is best effort: a missing tool (git, NVML, torch) gives None, never an exception.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import psutil

from common.files import PROJECT_ROOT
from runtime import openmp
from runtime.openmp import cpu_model

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "tokenizers", "accelerate", "numpy", "scipy", "spacy", "nltk",
             "datasets", "lm-eval", "psutil", "nvidia-ml-py", "matplotlib")


def collect(*, seed: int | None = None, model=None, device: str | None = None,
            scenario: str | None = None, nlp_backend: str | None = None, engine: dict | None = None,
            argv: Sequence[str] | None = None) -> dict:
    """Provenance of the current process; ``model`` is a LoadedModel (or anything with .name/.source).

    The full config is not repeated here: it is the top-level ``config`` of metrics.json.
    """
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "started_unix": time.time(),
        "wall_s": 0.0,
        "command": shlex.join(argv if argv is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git": git_state(),
        "model": model_info(model),
        "device": device,
        "hardware": hardware(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "nlp_backend": nlp_backend,
        "runtime": runtime(),
        "seed": seed,
        "scenario": scenario,
        "engine": engine,   # PruningEngine.describe(): importance, allocation, recovery, which data calibrated what
    }


def runtime() -> dict:
    """How the model ran: the OpenMP choice (policy, thread rule, its probes) and torch's threads now."""
    torch = sys.modules.get("torch")   # never imported for this
    return {"openmp": openmp.active().to_dict(), "torch_threads": torch.get_num_threads() if torch else None}


def stamp_wall_time(prov: dict, now: float | None = None) -> dict:
    """A copy with wall_s = seconds since the run started (unchanged when the start is unknown)."""
    started = prov.get("started_unix")
    if not isinstance(started, (int, float)):
        return dict(prov)
    return {**prov, "wall_s": round((now if now is not None else time.time()) - started, 3)}


def git_state(root: Path = PROJECT_ROOT) -> dict:
    """Commit and dirty flag; dirty counts tracked changes only (reports and caches are ignored)."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "branch": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD")}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.debug("git %s failed: %s", " ".join(args), err)
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def model_info(model) -> dict | None:
    """Id, source and parameter count of a LoadedModel-like object (duck-typed to stay torch-free)."""
    if model is None:
        return None
    params = getattr(model, "num_parameters", None)
    return {"id": getattr(model, "name", str(model)), "source": getattr(model, "source", None),
            "parameters": int(params) if isinstance(params, (int, float)) else None,
            # revision (Hub), sha256 of the weight files (local, embedded), and for the embedded model the format
            # ("Q4_1 GGUF dequantized to fp32": not the published bf16 weights)
            "weights": dict(getattr(model, "weights", None) or {})}


def hardware() -> dict:
    vm = psutil.virtual_memory()
    return {
        "cpu_model": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": round(vm.total / 2**30, 2),
        "gpus": gpu_names(),
    }


def gpu_names() -> list[str]:
    """GPU names from NVML, else from torch when it is already imported (never imported for this)."""
    names = _nvml_gpu_names()
    if names:
        return names
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def _nvml_gpu_names() -> list[str]:
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as err:   # NVMLError_LibraryNotFound, missing package, driver errors
        log.debug("NVML unavailable: %s", err)
        return []
    try:
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                 for i in range(pynvml.nvmlDeviceGetCount())]
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except Exception as err:
        log.debug("NVML query failed: %s", err)
        return []
    finally:
        pynvml.nvmlShutdown()


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed distribution versions (None when absent), read from metadata without importing."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
