"""How much two latency-table calibrations of the same actions disagree, per scenario and bucket.

Why: a reward built on a noisy table teaches the policy the noise. This prints each entry's speedup
(for `--tokens` new tokens) in every table given, and the largest ratio between them, so the
choice between `--load-timing measured` and `scaled` rests on numbers.

    PYTHONPATH=. python bench/table_noise.py bench/tables/pilot-test-measured.json bench/tables/train-v1-measured.json
"""
from __future__ import annotations

import argparse
import statistics

from modes.outputs import load_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="latency_table.json or metrics.json files")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens the speedup is computed for")
    args = parser.parse_args(argv)
    tables = [load_table(path) for path in args.tables]
    keys = [k for k in tables[0].entries if all(k in t.entries for t in tables[1:])]
    print(f"speedup (dense / pruned) at {args.tokens} new tokens in {len(tables)} calibrations")
    print("scenario|bucket|action | " + " | ".join(f"table {i + 1}" for i in range(len(tables))) + " | max/min")
    spread: dict[str, list[float]] = {}
    for key in keys:
        values = [t.entries[key].speedup(args.tokens) for t in tables]
        ratio = max(values) / min(values)
        spread.setdefault(key.split("|")[0], []).append(ratio)
        print(f"{key} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {ratio:.3f}")
    for scenario, ratios in spread.items():
        print(f"{scenario}: median max/min {statistics.median(ratios):.3f}, worst {max(ratios):.3f} over {len(ratios)} entries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
