"""Which matrices of an offline test (metrics.json's ``offline_test``) score which arm.

Why its own module: with a "...+lookahead" state an offline test holds two pricings
(``environments.precomputed.evaluate_offline``), the arms that read the look-ahead scored on one and every other
arm on the other, and every summary (``reporting.summaries``, ``reporting.study.equal_speed``) must pick them the
same way.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def offline_matrices(ot: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """Per pricing, metric -> [cells, actions]: "static" (the top level: every arm without a look-ahead) and, with a
    "...+lookahead" state, "lookahead" (the arms that read it; ``environments.precomputed.evaluate_offline``)."""
    budget = np.array([np.inf if b is None else b for b in ot["budget_s"]], dtype=float)

    def read(block: Mapping) -> dict[str, np.ndarray]:
        return {"reward": np.asarray(block["reward"], dtype=float),
                "ppl_ratio": np.asarray(block["ppl_ratio"], dtype=float),
                "speedup": np.asarray(block["speedup"], dtype=float),
                "slo_met": (np.asarray(block["latency_s"], dtype=float) <= budget[:, None]).astype(float)}
    return {"static": read(ot)} | ({"lookahead": read(ot["lookahead"])} if ot.get("lookahead") else {})


def arm_pricing(ot: Mapping, name: str) -> str:
    """Which pricing of ``offline_matrices`` an arm is scored by."""
    return "lookahead" if name in (ot.get("lookahead") or {}).get("arms", ()) else "static"
