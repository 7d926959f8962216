"""The shared ``main`` of the speed benchmarks: parse, run, print the table, keep the JSON (atomically)."""
from __future__ import annotations

import logging
from argparse import Namespace
from typing import Callable

from common.files import atomic_write_text, strict_json


def bench_main(argv: list[str] | None, parse_args: Callable[[list[str] | None], Namespace],
               run: Callable[[Namespace], dict], render: Callable[[dict], str]) -> None:
    """One benchmark run; ``--json`` (when the script has it and it is set) receives the full result."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    print(render(result))
    if getattr(args, "json", None):
        atomic_write_text(args.json, strict_json(result, indent=1))
