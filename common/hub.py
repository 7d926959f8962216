"""Decide once, before transformers/datasets/lm_eval are imported, whether the Hub is reachable.

Why: with no network every Hub miss costs ~23 s of retries, so the offline flags must be in the
environment before those libraries read them. Import this module first (the CLI and
`model_loader` do).
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from dotenv import load_dotenv

from common.files import PROJECT_ROOT

log = logging.getLogger(__name__)

HUB_HOST = "huggingface.co"
# A source checkout keeps its cache and .env beside the code; an installed package (site-packages) uses the
# user's cache folder and the .env of the working directory.
CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file()


def cache_dir() -> Path:
    """The checkout's .cache (git-ignored), or ~/.cache/adaptive-pruning when installed; ADAPTIVE_PRUNING_CACHE wins."""
    default = (PROJECT_ROOT / ".cache" if CHECKOUT
               else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptive-pruning")
    path = Path(os.environ.get("ADAPTIVE_PRUNING_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def hub_reachable(timeout_s: float = 1.5) -> bool:
    """One TCP connect to the Hub: cheap, and decisive enough to avoid long retry loops."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def hf_token() -> str | None:
    return os.environ.get("HUGGINGFACE_HUB_TOKEN") or os.environ.get("HF_TOKEN") or None


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def env_file() -> Path:
    """The .env read at start-up: the checkout's, or the working folder's for an installed package."""
    return (PROJECT_ROOT if CHECKOUT else Path.cwd()) / ".env"


def env_file_problem() -> str | None:
    """Why the .env cannot be read as UTF-8 text, or None (also when there is none)."""
    path = env_file()
    try:
        path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as err:
        return f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8 (see .env.example)"
    except OSError as err:
        return f"{path} cannot be read ({err.strerror}): fix its permissions or remove it"
    return None


def check_env_file() -> None:
    """Refuse to run on a .env that was skipped at import (its settings, e.g. the HF token, would be missing)."""
    problem = env_file_problem()
    if problem:
        raise ValueError(problem)


def configure() -> bool:
    """Set HF offline flags when the Hub cannot be reached (.env first: it may set them). True when online."""
    if env_file_problem() is None:   # an unreadable .env is refused by the CLI (check_env_file), not at import
        load_dotenv(env_file(), override=False)
    os.environ.setdefault("HF_HOME", str(cache_dir() / "huggingface"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        return False
    if hub_reachable():
        return True
    log.info("Hugging Face Hub unreachable: running offline (HF_HUB_OFFLINE=1)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    return False


configure()   # at import: the flags must be set before transformers/datasets/lm_eval read them
