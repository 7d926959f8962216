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


def configure() -> bool:
    """Set HF offline flags when the Hub cannot be reached (.env first: it may set them). True when online."""
    load_dotenv((PROJECT_ROOT if CHECKOUT else Path.cwd()) / ".env", override=False)
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
