"""Read speed of the decode kernel's products on weights that are not in cache, per SmolLM2-135M shape (issue 25).

A decode step reads every weight once, from memory: the question is how close each product gets to the bytes'
read speed, not its in-cache arithmetic. Each shape is timed over enough distinct random weights to fill
``--megabytes`` (cycled, so no weight is in cache when it is read), at every thread count, in alternating order
over ``--rounds``; the best round per cell. Rows: fp32 row-major (``Product`` of an fp32 weight), int8
row-major (int16 activations, prefetch), int8 column blocks at the full width and at FFN 0.2's down_proj
width (``runtime.dtype.column_blocks``), and one read pass over the same fp32 bytes (``Tensor.sum``) as the reference.
GB/s counts the weight bytes each product needs (a prefix reads its prefix).

    PYTHONPATH=. .venv/bin/python bench/matvec_cold.py --json bench/matvec_cold.json
"""
from __future__ import annotations

import sys

from runtime import openmp  # torch-free: the wait policy must be set before torch loads libgomp

if __name__ == "__main__":
    openmp.configure(measure_if_missing="-h" not in sys.argv and "--help" not in sys.argv)

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from bench.script import bench_main  # noqa: E402
from runtime.dtype import column_blocks  # noqa: E402
from runtime.matvec import matvec_kernel  # noqa: E402
from runtime.threads import torch_threads  # noqa: E402

SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}
PREFIX = 0.8        # FFN 0.2's share of down_proj's columns


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=float, default=96.0, help="int8 bytes of distinct weights cycled per shape")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def cases(kernel, n: int, k: int, count: int) -> dict[str, tuple[Callable[[int], object], int]]:
    """name -> (product of weight i, weight bytes it reads)."""
    q8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(count)]
    f32 = [w.float() for w in q8]
    blocks = [column_blocks(w) for w in q8]
    scale, x = torch.rand(n), torch.randn(k)
    cols = int(k * PREFIX)
    xp = torch.randn(cols)
    return {"fp32 rows": (lambda i: kernel.Product(f32[i])(x), 4 * n * k),
            "int8 rows": (lambda i: kernel.Product(q8[i], scale)(x), n * k),
            "int8 blocks": (lambda i: kernel.Product(blocks[i], scale, rows=n, cols=k)(x), n * k),
            f"int8 blocks {PREFIX:.0%} cols": (lambda i: kernel.Product(blocks[i], scale, rows=n, cols=cols)(xp),
                                               n * cols),
            "fp32 read pass": (lambda i: f32[i].sum(), 4 * n * k)}


def run(args: argparse.Namespace) -> dict:
    kernel = matvec_kernel("native")
    threads = openmp.thread_candidates(openmp.usable_cores())
    started = time.time()
    rows = []
    for shape, (n, k) in SHAPES.items():
        count = max(2, int(args.megabytes * 1e6 // (n * k)))
        products = cases(kernel, n, k, count)
        best: dict[tuple[str, int], float] = {}
        for r in range(args.rounds):
            order = [(name, t) for name in products for t in threads]
            for name, t in (order if r % 2 == 0 else order[::-1]):
                fn, _ = products[name]
                with torch_threads(t):
                    fn(0)
                    start = time.perf_counter()
                    for i in range(count):
                        fn(i)
                    seconds = (time.perf_counter() - start) / count
                best[name, t] = min(best.get((name, t), seconds), seconds)
        for (name, t), seconds in best.items():
            rows.append({"shape": shape, "product": name, "threads": t, "us": seconds * 1e6,
                         "gb_per_s": products[name][1] / seconds / 1e9})
    return {"settings": {"megabytes": args.megabytes, "rounds": args.rounds, "threads": list(threads),
                         "cpu": openmp.cpu_model(), "torch": torch.__version__, "platform": platform.platform(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
                         "wall_s": round(time.time() - started, 1)},
            "rows": rows}


def format_tables(result: dict) -> str:
    s = result["settings"]
    lines = [f"{s['cpu']}, torch {s['torch']}; {s['megabytes']:.0f} MB of int8 weights cycled per shape, best of "
             f"{s['rounds']} alternating rounds; started {s['started']}, {s['wall_s']} s", "",
             "shape | product | threads | us | GB/s", "--- | --- | --- | --- | ---"]
    for r in sorted(result["rows"], key=lambda r: (list(SHAPES).index(r["shape"]), r["threads"], r["product"])):
        lines.append(f"{r['shape']} | {r['product']} | {r['threads']} | {r['us']:.1f} | {r['gb_per_s']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run, format_tables)


if __name__ == "__main__":
    main()
