"""The decode step's matrix-vector products on a kernel of our own (``matvec.cpp``), fp32 and int8 weights.

Why: single-stream decode is one matrix-vector product per weight, so it is bound by how fast the kernel
streams the weight bytes. torch's are far from that here (issue 25, SmolLM2-135M's matrices, 2-core AMD
EPYC): MKL's one-row fp32 product ran on one thread whatever ``torch.set_num_threads`` said, at about 1.7x
a one-pass read of the same bytes, and torch's int8 weight-only kernel at about 2x. This kernel splits
the output rows over torch's thread count, on a task pool of its own (``tasks.cpp``: a region ends when its tasks are
done, not at a barrier that waits for a thread the OS has not scheduled), and streams each row once (AVX2/FMA where
the compiler targets it), which measured 22 ms against MKL's 36 ms for the fp32 bytes of one step and 8 ms for their
int8 copy (read floor 7.7 ms; ``bench/decode_limit.py`` has the per-run figures).

How: ``torch.utils.cpp_extension`` compiles it with the machine's C++ compiler (``-O3 -march=native``)
the first time it is needed (about a minute), into the project cache under a key of the source, its path, the
compiler flags and the torch and Python versions, so later runs load it in milliseconds. It reads every weight in
place through its strides, so the engine's zero-copy prefix views (a row prefix of q/k/v/gate/up, a
column prefix of o_proj/down_proj) stay zero-copy; int8 column prefixes are read from one copy of the shadow in
column blocks (``runtime.dtype.column_blocks``: a strided row prefix saved no bandwidth there), never a copy per
width.
``runtime.dtype.set_kernel(model, kernel)`` routes every one-row fp32 and int8 Linear call through it;
batches (prefill, serving) keep torch's kernels, which do batch well. No library covers this here: torch
has no such kernel, and intel-extension-for-pytorch (whose weight-only kernels do) stops at torch 2.8.

``--matvec``: ``auto`` (default) uses it where it builds with its vectorised path and the device is the
CPU, else torch's kernels, and logs which; ``native`` insists (an error names the fix when it cannot
build); ``torch`` never builds it.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from common.config import MATVEC_KERNELS
from common.hub import cache_dir

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("matvec.h", "matvec.cpp", "tasks.cpp", "lean_step.cpp"))
CFLAGS = ("-O3", "-march=native", "-fopenmp")
STALE_LOCK_S = 900.0         # a build takes about a minute; a lock this old was left by a killed one


class KernelBuildError(RuntimeError):
    pass


def check_matvec(name: str) -> str:
    if name not in MATVEC_KERNELS:
        raise ValueError(f"--matvec {name}: choose from {', '.join(MATVEC_KERNELS)}")
    return name


@functools.lru_cache(maxsize=1)
def load_kernel() -> ModuleType:
    """The compiled extension (built on first use, then loaded from the cache); KernelBuildError says why not.

    Memoised: a process loads an extension once, and every later call must get that same module. A built
    library is imported directly: ``cpp_extension.load`` would re-run ninja and take the build folder's lock
    on every load, and a process frozen or killed while holding that lock would stall every later one.
    The key includes the source's path, so two checkouts sharing one cache do not rebuild each other's.
    """
    key = hashlib.sha256(b"".join(p.read_bytes() + str(p).encode() for p in SOURCES) + " ".join(CFLAGS).encode()
                         + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    name = f"adaptive_matvec_{key}"
    build = cache_dir() / "kernels" / key
    built = build / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[-1]}"
    if not built.is_file():
        _build(name, build)
    spec = importlib.util.spec_from_file_location(name, built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, build: Path) -> None:
    from torch.utils import cpp_extension

    build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("removing %s, left by a build that never finished", lock)
        lock.unlink(missing_ok=True)
    log.info("building the decode kernel (runtime/matvec.cpp, tasks.cpp, lean_step.cpp) into %s: about a minute, "
             "once per machine", build)
    try:
        cpp_extension.load(name=name, sources=[str(p) for p in SOURCES if p.suffix == ".cpp"],
                           extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"], build_directory=str(build),
                           verbose=False)
    except Exception as err:        # noqa: BLE001 — no compiler, no ninja, a failed build: all mean "use torch's"
        raise KernelBuildError(f"the decode kernel (runtime/matvec.cpp, tasks.cpp, lean_step.cpp) did not build "
                               f"({str(err).strip()[-300:]}); "
                               "install a C++ compiler and ninja (pip install ninja), or pass --matvec torch") from err


def matvec_kernel(name: str, device: torch.device | str = "cpu") -> ModuleType | None:
    """The kernel ``--matvec name`` asks for on ``device``: the extension, or None for torch's kernels."""
    check_matvec(name)
    if name == "torch":
        return None
    if torch.device(device).type != "cpu":
        if name == "native":
            raise KernelBuildError(f"--matvec native: the decode kernel is for the CPU, not {device}; "
                                   "use --matvec auto or torch")
        return None
    if name == "native":
        return load_kernel()
    try:
        kernel = load_kernel()
    except KernelBuildError as err:
        log.warning("%s; decoding with torch's kernels", err)
        return None
    if not kernel.vectorized():
        log.warning("the decode kernel built without AVX2/FMA (not this CPU or compiler): decoding with torch's "
                    "kernels, which are faster than its plain loops")
        return None
    return kernel


def one_row(x: torch.Tensor) -> bool:
    """A decode-step input (one token of one sequence) that no gradient needs: the kernel's case."""
    return x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and x.requires_grad)


class KernelLinear(nn.Linear):
    """An fp32 nn.Linear whose one-row calls run the decode kernel on its current (possibly prefix-view) weight.

    Set by ``runtime.dtype.apply_weight_dtype`` (class swap; it adds the ``kernel`` attribute), never
    constructed directly; batches and anything that needs a gradient run ``F.linear`` as before.
    """
    kernel: ModuleType

    def kernel_product(self):
        """The kernel's product for the current weight view, bias included (read in place: the engine's prefix views
        stay zero-copy). A caller that makes many calls with the view fixed (runtime.lean: one generation) keeps it."""
        return self.kernel.Product(self.weight, bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not one_row(x) or x.dtype != torch.float32 or self.weight.requires_grad and torch.is_grad_enabled():
            return nn.functional.linear(x, self.weight, self.bias)
        return self.kernel_product()(x.reshape(-1).contiguous()).reshape(*x.shape[:-1], -1)
