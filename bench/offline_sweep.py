"""Where adaptivity pays: policy - baselines across latency budgets (SLO levels) and budget weights.

Why: the learned policy can only win where the best action depends on the load and the prompt;
with a loose budget "dense" is best everywhere and with a huge penalty "prune hardest under load"
is a fixed rule. Each grid point re-fits every baseline and re-trains every seed on the training
split of an offline train run and scores them on a test run's cells (controller.study,
the same code as --mode test), from the two runs' metrics.json alone: no model, seconds per seed.
Hyper-parameters are the train run's; nothing here is chosen on the test split.

    PYTHONPATH=. python bench/offline_sweep.py --train reports/train-... --test reports/test-... \\
        --latency-budgets 1.1,1.5,2.0,3.0 --budget-weights 0.5,1,4 --out bench/sweep
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from common.config import DQNConfig, RewardConfig
from common.files import strict_json
from controller.arms import ARM_NAMES
from environments.precomputed import OfflineData, OfflineEnvironment
from controller.study import NO_PROMPT, run_study, side_ablations
from reporting.render import load_metrics
from reporting.summaries import summarize_offline

log = logging.getLogger("offline_sweep")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def sweep(train: dict, test: dict, budgets: list[float], weights: list[float], episodes: int, seeds: int) -> list[dict]:
    cfg = train["config"]
    data = OfflineData.from_record(train["offline"]).merged(OfflineData.from_record(test["offline"]))
    train_ids, test_ids = [p["id"] for p in train["offline"]["prompts"]], [p["id"] for p in test["offline"]["prompts"]]
    labels = train["action_space"]
    dqn = DQNConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["dqn"].items()})
    points = []
    for budget in tqdm(budgets, desc="latency budgets"):
        for weight in weights:
            reward = replace(RewardConfig(**cfg["reward"]), latency_budget=budget, budget_weight=weight)
            envs = [OfflineEnvironment(data, ids, split, labels, reward, cfg["env"]["long_prompt_tokens"],
                                       cfg["state_features"], cfg["ablation"],
                                       lookahead_tokens=cfg["offline"].get("lookahead_tokens"))
                    for ids, split in ((train_ids, "train"), (test_ids, "test"))]
            names = envs[0].state_names   # probe names: from the data
            result = run_study(*envs, names, dqn, episodes, [cfg["seed"] + i for i in range(seeds)],
                               cfg["offline"]["telemetry_draws"], cfg["seed"])
            summary = summarize_offline(result)
            points.append({"latency_budget": budget, "budget_weight": weight,
                           "strongest": summary["strongest_baseline"], "claim": summary["verdict"]["claim"],
                           "groups": {g: {arm: {"vs": row["arms"][arm]["vs"], "slo_met": row["arms"][arm]["slo_met"],
                                                "ppl_ratio": row["arms"][arm]["ppl_ratio"]}
                                          for arm in (*ARM_NAMES, "random", "oracle", *side_ablations(cfg["ablation"]))}
                                      | {"policy": {"slo_met": row["arms"]["policy"]["slo_met"],
                                                    "ppl_ratio": row["arms"]["policy"]["ppl_ratio"]}}
                                      for g, row in summary["by_level"].items()}})
            log.info("budget x%.2f, weight %.2f: %s", budget, weight, points[-1]["claim"])
    return points


def plot(points: list[dict], out: Path) -> Path:
    """Per level and pooled, against the budget weight, one line per SLO level (latency budget): policy -
    strongest fitted baseline (top row: where adapting to the load and the prompt pays), and policy - its
    no-prompt ablation where it was trained (bottom row: what the prompt features alone add), 95% CIs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(points[0]["groups"])
    rows = [("strongest", "policy − strongest baseline (reward)")]
    if all(NO_PROMPT in p["groups"][g] for p in points for g in groups):
        rows.append((NO_PROMPT, "policy − no-prompt ablation (reward)"))
    fig, axes = plt.subplots(len(rows), len(groups), figsize=(4.2 * len(groups), 3.6 * len(rows)), sharey="row",
                             squeeze=False)
    for (arm, ylabel), ax_row in zip(rows, axes):
        for ax, g in zip(ax_row, groups):
            for budget in sorted({p["latency_budget"] for p in points}):
                mine = sorted((p for p in points if p["latency_budget"] == budget), key=lambda p: p["budget_weight"])
                ci = [p["groups"][g][p["strongest"] if arm == "strongest" else arm]["vs"] for p in mine]
                x = [p["budget_weight"] for p in mine]
                ax.errorbar(x, [c["mean"] for c in ci], yerr=[[c["mean"] - c["lo"] for c in ci],
                                                               [c["hi"] - c["mean"] for c in ci]],
                            marker="o", capsize=3, label=f"budget ×{budget:g}")
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(g)
            ax.set_xlabel("budget weight")
        ax_row[0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="an offline train run folder")
    parser.add_argument("--test", required=True, help="an offline test run folder of the same calibration set")
    parser.add_argument("--latency-budgets", type=floats, default=[1.1, 1.5, 2.0, 3.0])
    parser.add_argument("--budget-weights", type=floats, default=[0.5, 1.0, 4.0])
    parser.add_argument("--episodes", type=int, default=5000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench/sweep")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = sweep(load_metrics(Path(args.train)), load_metrics(Path(args.test)), args.latency_budgets,
                   args.budget_weights, args.episodes, args.seeds)
    (out / "sweep.json").write_text(strict_json(points, indent=1))
    print(f"plot: {plot(points, out)}")
    for p in points:
        print(f"budget x{p['latency_budget']:g}, weight {p['budget_weight']:g}: {p['claim']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
