"""The decode kernel (runtime.matvec): the products it computes, the views it reads in place, and where it runs."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from pruners import ACTION_SPACE, NONE
from pruners.engine import PruningEngine
from runtime.dtype import (ShadowLinear, apply_weight_dtype, column_blocks, decoder_linears, restore_weight_dtype,
                           set_kernel)
from runtime.generation import generate
from runtime.matvec import KernelBuildError, KernelLinear, check_matvec, matvec_kernel


def views(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weight views the engine hands a Linear: whole, row prefix, column prefix, both; row- and column-major."""
    col = w.t().contiguous().t()
    return {f"{layout} {name}": v for layout, m in (("row", w), ("column", col))
            for name, v in (("whole", m), ("rows", m[:29]), ("columns", m[:, :21]), ("both", m[:29, :21]))}


def test_fp32_products_match_torch_on_every_view(kernel):
    w = torch.randn(67, 45)                      # odd sizes: the vector loops' tails run too
    for name, v in views(w).items():
        x = torch.randn(v.shape[1])
        assert v.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() or "column" in name
        torch.testing.assert_close(kernel.Product(v)(x), v @ x, rtol=1e-5, atol=1e-5, msg=name)


QBLOCK = 256     # matvec.cpp's kQBlock: columns per int16 activation scale


def int16_product(w: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 kernels' documented product, in torch: x quantized to int16 per QBLOCK columns (scale max|x| / 32767,
    round half to even), exact integer products; and the bound on its distance from the fp32-activation product
    (half a quantization step per column, times |w|)."""
    step = torch.cat([(b.abs().max() / 32767).clamp_min(1e-30).expand(len(b)) for b in x.split(QBLOCK)])
    xq = torch.round(x / step).double()
    sums = [(wb.double() @ xb) * sb[0].double() for wb, xb, sb in zip(w.split(QBLOCK, 1), xq.split(QBLOCK),
                                                                      step.split(QBLOCK))]
    rows = scale[:w.shape[0]]
    return torch.stack(sums).sum(0).float() * rows, (w.float().abs() @ (step / 2)) * rows + 1e-5


def assert_int16_product(got: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> None:
    """``got`` is ``int16_product`` up to fp32 rounding: each block's exact int32 sum is converted and the blocks are
    added in fp32, so the error is a few ulps of the sum of |terms| (a row's terms can cancel: a bound relative to
    the row's own value failed on ~3 % of random draws)."""
    expected, _ = int16_product(w, scale, x)
    magnitude = (w.float().abs() @ x.abs()) * scale[:w.shape[0]]
    assert ((got - expected).abs() <= 1e-6 * magnitude + 1e-6).all(), (got - expected).abs().max()


def test_int8_products_are_the_int16_activation_product_on_prefix_views(kernel):
    q = torch.randint(-127, 128, (70, 600), dtype=torch.int8)     # three activation blocks, the last a part one
    scale = torch.rand(70) + 0.01
    for v in (q, q[:33], q[:, :41], q[:33, :300], q[:, :53]):
        x = torch.randn(v.shape[1]) * torch.linspace(0.1, 10, v.shape[1])     # blocks of different ranges
        _, bound = int16_product(v, scale, x)
        got = kernel.Product(v, scale)(x)
        assert_int16_product(got, v, scale, x)
        assert ((got - (v.float() @ x) * scale[:v.shape[0]]).abs() <= bound).all()     # near the fp32 product


@pytest.mark.parametrize("rows,cols", [(70, 53), (33, 53), (70, 41), (33, 16), (5, 7)])
def test_int8_column_blocks_give_the_product_of_every_prefix(kernel, rows, cols):
    """A prefix of the blocked copy is the prefix of the weight: whole blocks, a part of one, fewer than a block."""
    q = torch.randint(-127, 128, (70, 53), dtype=torch.int8)
    scale = torch.rand(70) + 0.01
    blocks = column_blocks(q, width=16)
    assert blocks.shape == (4, 70, 16) and torch.equal(blocks[3, :, 5:], torch.zeros(70, 11, dtype=torch.int8))
    x = torch.randn(cols)
    assert_int16_product(kernel.Product(blocks, scale, rows=rows, cols=cols)(x), q[:rows, :cols], scale, x)


def test_int8_column_blocks_and_activation_blocks_need_not_align(kernel):
    """Column blocks of 96 against activation blocks of 256: a column block straddles an activation block."""
    q = torch.randint(-127, 128, (37, 700), dtype=torch.int8)
    scale = torch.rand(37) + 0.01
    x = torch.randn(650) * torch.linspace(0.1, 10, 650)
    assert_int16_product(kernel.Product(column_blocks(q, width=96), scale, rows=37, cols=650)(x), q[:, :650], scale, x)
    assert_int16_product(kernel.Product(q[:, :650], scale)(x), q[:, :650], scale, x)


def test_bad_operands_are_refused_with_the_reason(kernel):
    with pytest.raises(RuntimeError, match="contiguous fp32 vector of the weight's 6 columns"):
        kernel.Product(torch.randn(8, 6))(torch.randn(5))
    with pytest.raises(RuntimeError, match="row- or column-major"):
        kernel.Product(torch.randn(8, 12)[:, ::2])
    with pytest.raises(RuntimeError, match="scale of at least its 8 rows"):
        kernel.Product(torch.zeros(8, 6, dtype=torch.int8), torch.ones(4))
    with pytest.raises(RuntimeError, match="bias must be a contiguous fp32 vector of the product's 8 rows"):
        kernel.Product(torch.randn(8, 6), bias=torch.ones(7))
    blocks = column_blocks(torch.zeros(8, 6, dtype=torch.int8), width=4)
    with pytest.raises(RuntimeError, match="9 rows and 6 columns do not fit a weight of 8 rows and 8 columns"):
        kernel.Product(blocks, torch.ones(9), rows=9, cols=6)


def test_a_product_adds_its_bias_on_every_layout(kernel):
    w, bias = torch.randn(40, 30), torch.randn(40)
    q, scale = torch.randint(-127, 128, (40, 30), dtype=torch.int8), torch.rand(40) + 0.01
    x = torch.randn(30)
    torch.testing.assert_close(kernel.Product(w, bias=bias)(x), w @ x + bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel.Product(w.t().contiguous().t(), bias=bias)(x), w @ x + bias, rtol=1e-5,
                               atol=1e-5)
    expected = kernel.Product(q, scale)(x) + bias
    torch.testing.assert_close(kernel.Product(q, scale, bias=bias)(x), expected)
    torch.testing.assert_close(kernel.Product(column_blocks(q, width=16), scale, rows=40, cols=30, bias=bias)(x),
                               expected, rtol=1e-5, atol=1e-4)
    assert kernel.Product(w[:7, :5]).shape == (7, 5)


def test_the_choice_of_kernel(kernel):
    assert matvec_kernel("torch") is None
    assert matvec_kernel("native") is kernel and matvec_kernel("auto") is (kernel if kernel.vectorized() else None)
    assert matvec_kernel("auto", "cuda") is None
    with pytest.raises(KernelBuildError, match="--matvec auto or torch"):
        matvec_kernel("native", "cuda")
    with pytest.raises(ValueError, match="choose from auto, native, torch"):
        check_matvec("fast")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids[:, :1]).logits        # one token: the kernel's case


def test_every_action_decodes_the_same_on_the_kernel(tiny, ids, tmp_path, kernel):
    model = tiny.model
    engine = PruningEngine(model, tokenizer=tiny.tokenizer, cache_dir=tmp_path)
    reference = {}
    for action in ACTION_SPACE:
        with engine.pruned(action):
            reference[action.label] = (logits(model, ids), generate(model, ids, 6, engine=engine).tokens)
    set_kernel(model, kernel)
    linears = decoder_linears(model) + [model.lm_head]
    assert all(isinstance(m, KernelLinear) for m in linears)
    for action in ACTION_SPACE:
        with engine.pruned(action):
            torch.testing.assert_close(logits(model, ids), reference[action.label][0], rtol=1e-4, atol=1e-4,
                                       msg=action.label)
            assert generate(model, ids, 6, engine=engine).tokens == reference[action.label][1], action.label
    set_kernel(model, None)
    assert not any(isinstance(m, KernelLinear) for m in model.modules())
    assert torch.equal(logits(model, ids), reference[NONE.label][0])    # torch's kernels again, bit for bit


def test_int8_on_the_kernel_reads_the_shadow_in_place(tiny, ids, tmp_path, kernel):
    model = tiny.model
    engine = PruningEngine(model, tokenizer=tiny.tokenizer, cache_dir=tmp_path)
    apply_weight_dtype(model, "int8")
    torch_int8 = {}
    for action in ACTION_SPACE:
        with engine.pruned(action):
            torch_int8[action.label] = logits(model, ids)
    set_kernel(model, kernel)
    assert all(isinstance(m, ShadowLinear) and m.kernel is kernel for m in decoder_linears(model))
    for m in decoder_linears(model):
        m._columns.clear()                                                 # torch's kernel made these
    for action in ACTION_SPACE:
        with engine.pruned(action):
            # fp32 activations against torch's bf16 ones: close, not equal
            got, want = logits(model, ids), torch_int8[action.label]
            assert (got - want).abs().max() < 0.05 * want.abs().max(), action.label
    assert all(not m._columns for m in decoder_linears(model))          # no padded column copies were made
    blocked = [m for m in decoder_linears(model) if m._blocks]
    # column prefixes (o_proj for heads, down_proj for FFN) read one blocked copy each, made once; rows never
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m in blocked} == {"o_proj", "down_proj"}
    assert all(len(m._blocks) == 1 for m in blocked)
    restore_weight_dtype(model)
    assert all(isinstance(m, KernelLinear) for m in decoder_linears(model))   # float32 stays on the kernel


def test_batches_and_gradients_keep_torchs_kernel(kernel):
    layer = nn.Linear(16, 8, bias=True)
    x = torch.randn(3, 16)
    expected = layer(x)
    layer.__dict__["kernel"] = kernel
    layer.__class__ = KernelLinear
    torch.testing.assert_close(layer(x), expected)                         # three rows: F.linear
    one = torch.randn(1, 1, 16, requires_grad=True)
    layer(one).sum().backward()                                            # a gradient: F.linear
    assert one.grad is not None and one.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(layer(one), nn.functional.linear(one, layer.weight, layer.bias))


def test_a_failed_build_names_the_fix_and_a_stale_lock_is_cleared(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    from runtime import matvec

    lock = tmp_path / "lock"
    lock.touch()
    old = lock.stat().st_mtime - matvec.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    seen = []

    def failing_load(**kwargs):
        seen.append(lock.exists())
        raise RuntimeError("g++: not found")
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(KernelBuildError, match="g\\+\\+: not found.*--matvec torch"):
        matvec._build("adaptive_matvec_test", tmp_path)
    assert seen == [False]                     # the lock a killed build left no longer blocks this one


def test_two_threads_share_the_tasks_and_give_the_one_thread_result(kernel, restore_threads):
    """parallel_tasks: each output row is one task's, whichever thread claims it (its own share or a stolen half), so
    two threads reproduce one thread's bits; a task left out would leave the output's uninitialised memory."""
    products = kernel_products(kernel)
    torch.set_num_threads(2)
    for _ in range(20):
        for name, (p, x, one) in products.items():
            assert torch.equal(p(x), one), name


def kernel_products(kernel) -> dict[str, tuple[object, torch.Tensor, torch.Tensor]]:
    """A product per layout with its input and its one-thread output; leaves torch at 1 thread (the caller's test
    takes ``restore_threads``)."""
    q = torch.randint(-127, 128, (301, 700), dtype=torch.int8)
    w, scale = torch.randn(301, 700), torch.rand(301) + 0.01
    torch.set_num_threads(1)
    out = {}
    for name, p, cols in (("fp32 rows", kernel.Product(w[:, :650]), 650),
                          ("fp32 columns", kernel.Product(w.t().contiguous().t()), 700),
                          ("int8 rows", kernel.Product(q, scale), 700),
                          ("int8 blocks", kernel.Product(column_blocks(q, width=96), scale, rows=290, cols=650), 650)):
        x = torch.randn(cols)
        out[name] = (p, x, p(x))
    return out


@pytest.mark.parametrize("threads", [3, 8])
def test_more_threads_than_cores_give_the_one_thread_result(kernel, threads, restore_threads):
    """The task pool (runtime/tasks.cpp) with more workers than cores: most regions start while some worker is not
    running, and it must neither lose a task nor run one twice."""
    products = kernel_products(kernel)
    torch.set_num_threads(threads)
    for _ in range(50):
        for name, (p, x, one) in products.items():
            assert torch.equal(p(x), one), name


def test_two_python_threads_can_run_products_at_once(kernel, restore_threads):
    """The kernel releases the GIL, so two callers can reach the pool together: one runs its region on the pool and
    the other its tasks itself, both correct."""
    import threading
    products = kernel_products(kernel)
    failures: list[str] = []

    def caller() -> None:
        for _ in range(100):
            for name, (p, x, one) in products.items():
                if not torch.equal(p(x), one):
                    failures.append(name)

    torch.set_num_threads(2)
    callers = [threading.Thread(target=caller) for _ in range(2)]
    for c in callers:
        c.start()
    for c in callers:
        c.join(timeout=120)
    assert not any(c.is_alive() for c in callers), "a caller hung"
    assert failures == []


def test_a_forked_child_runs_the_pool_of_its_own(kernel, restore_threads):
    """A child forked after the pool started has none of its workers: its regions still finish, with the same
    result (it starts workers of its own)."""
    import multiprocessing
    products = kernel_products(kernel)
    torch.set_num_threads(2)
    for p, x, _ in products.values():
        p(x)                                       # the parent's pool is running
    child = multiprocessing.get_context("fork").Process(target=_check_products, args=(products,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the child hung or gave another result"


def _check_products(products) -> None:
    torch.set_num_threads(2)
    for _ in range(20):
        for p, x, one in products.values():
            if not torch.equal(p(x), one):
                os._exit(1)
    os._exit(0)


def test_idle_workers_sleep_rather_than_spin(kernel, restore_threads):
    """Between generations the pool's workers must give the cores back (under load a spinning worker takes a core
    from the decode): after a region they spin about a millisecond, then sleep."""
    import resource
    import time
    products = kernel_products(kernel)
    torch.set_num_threads(2)
    for p, x, _ in products.values():
        p(x)
    time.sleep(0.05)
    used = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert (after.ru_utime + after.ru_stime) - (used.ru_utime + used.ru_stime) < 0.05
