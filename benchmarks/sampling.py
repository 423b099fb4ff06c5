"""Samplers for a large and a small related task: the small task's test metric.

Two regression tasks of the MMoE synthetic generator (Ma et al., KDD 2018) with correlation
``--correlation`` (0.9) on ``--input-dim`` (20) inputs: task ``t1`` has its own dataset of
``--large`` (20,000) training samples, task ``t2`` its own dataset of ``--small`` (200) — a 100:1
size ratio. The two datasets come from one generator (same seed, so the same task weights) with
disjoint inputs: the script registers a dataset ``mmoe-synthetic-part`` that keeps a slice of the
generated rows with a fixed train/val/test split, so the small task has 200 training samples but
a 2,000-sample test set (a low-noise metric). One model (a shared MLP trunk of 64 units, a 16-unit
tower per task, ``hard_sharing``, equal weighting) is trained with each registered sampler, in
each batch mode, plus ``t2`` alone (its dataset only, for the same number of steps). Every run
draws the same number of batches (an epoch is one pass over both datasets, ``epoch: sum``) and
keeps the checkpoint with the best validation loss of ``t2`` (200 validation samples).

The table gives, over ``--seeds`` seeds (the seed draws the task weights, the data and the
initialisation), the mean ± std of t2's test R² and RMSE, of the per-seed difference between
t2's test R² and that of t2 alone (paired: the seeds' different difficulty cancels), t1's test
R², and t2's share of the labelled samples drawn in the last epoch.

With the generator's default 100 input dimensions, 200 samples are too few: t2's test R² is
negative with every sampler and alone (one seed: −0.04 to −0.63), so the default is 20.

    .venv/bin/python benchmarks/sampling.py                  # 5 seeds, 10 epochs (~7 min, 2 cores)
    .venv/bin/python benchmarks/sampling.py --seeds 2 --epochs 4 --modes mixed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from polytask.config import parse_config  # noqa: E402
from polytask.data.sources import DATASETS  # noqa: E402
from polytask.data.sources.synthetic import mmoe_synthetic  # noqa: E402
from polytask.data.table import MultiLabelTable  # noqa: E402
from polytask.evaluate import mean_std  # noqa: E402
from polytask.run import train_run  # noqa: E402

#: (label, sampler section) of each compared configuration
SAMPLERS: list[tuple[str, dict[str, Any]]] = [
    ("proportional", {"name": "proportional"}),
    ("uniform", {"name": "uniform"}),
    ("temperature T=2", {"name": "temperature", "params": {"temperature": 2.0}}),
    ("temperature T=5", {"name": "temperature", "params": {"temperature": 5.0}}),
    ("round_robin", {"name": "round_robin"}),
    ("annealed", {"name": "annealed"}),
    ("fixed 3:1", {"name": "fixed"}),
]
FIXED_WEIGHTS = (3.0, 1.0)


def mmoe_synthetic_part(
    *,
    seed: int,
    first: int = 0,
    train: int = 1000,
    val: int = 100,
    test: int = 100,
    correlation: float = 0.9,
    input_dim: int = 100,
) -> MultiLabelTable:
    """Rows ``first .. first+train+val+test`` of ``mmoe-synthetic`` (same seed: same tasks) with
    a fixed split: the first ``train`` rows train, then ``val``, then ``test``."""
    total = first + train + val + test
    table = mmoe_synthetic(
        seed=seed, num_samples=total, correlation=correlation, input_dim=input_dim
    )
    keep = slice(first, total)
    assert isinstance(table.inputs, np.ndarray)
    return MultiLabelTable(
        inputs=table.inputs[keep],
        targets={k: v[keep] for k, v in table.targets.items()},
        tasks=table.tasks,
        feature_names=table.feature_names,
        split=np.repeat([0, 1, 2], [train, val, test]),
        source=f"mmoe-synthetic rows {first}..{total - 1}",
    )


if "mmoe-synthetic-part" not in DATASETS:
    DATASETS.register("mmoe-synthetic-part", "a slice of mmoe-synthetic with a fixed split")(
        mmoe_synthetic_part
    )


def run_config(
    label: str,
    sampler: dict[str, Any] | None,
    mode: str,
    seed: int,
    args: argparse.Namespace,
    output: Path,
) -> dict[str, Any]:
    """The recipe of one run; ``sampler=None``: t2 alone for the same number of steps."""
    common = {"correlation": args.correlation, "input_dim": args.input_dim}
    large = {
        "dataset": "mmoe-synthetic-part",
        "params": {**common, "first": 0, "train": args.large, "val": 1000, "test": 1000},
        "tasks": ["t1"],
    }
    small = {
        "dataset": "mmoe-synthetic-part",
        "params": {
            **common,
            "first": args.large + 2000,
            "train": args.small,
            "val": 200,
            "test": 2000,
        },
        "tasks": ["t2"],
    }
    data: dict[str, Any] = {"batch_size": args.batch_size, "batch_mode": mode}
    if sampler is None:
        data.update(datasets=[small], epoch=f"steps:{steps_per_epoch(args)}")
    else:
        if sampler["name"] == "fixed":
            large["weight"], small["weight"] = FIXED_WEIGHTS
        data.update(datasets=[large, small], sampler=sampler, epoch="sum")
    name = label.replace(" ", "-").replace(":", "-").replace("=", "")
    return {
        "name": f"{name}-{mode}",
        "seed": seed,
        "output_dir": str(output),
        "data": data,
        "model": {
            "encoder": "mlp",
            "encoder_params": {"hidden": [64]},
            "head": "mlp",
            "head_params": {"hidden": [16]},
            "architecture": "hard_sharing",
        },
        "balancing": {"method": "equal"},
        "optimizer": {"name": "adamw", "lr": 2e-3},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {
            "epochs": args.epochs,
            "early_stopping": {"metric": "t2/loss"},
            "progress": False,
        },
    }


def steps_per_epoch(args: argparse.Namespace) -> int:
    """Batches per epoch of the two-dataset runs (``epoch: sum``)."""
    return -(-(args.large + args.small) // args.batch_size)


def spread(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def train_one(config: dict[str, Any]) -> dict[str, float]:
    """Train one run; its test metrics and t2's share of the last epoch's samples."""
    result = train_run(parse_config(config))
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    seen = json.loads(lines[-1])["seen"]
    out = {
        "t2 r2": result.test["t2"]["r2"],
        "t2 rmse": result.test["t2"]["rmse"],
        "share": seen["t2"] / sum(seen.values()),
    }
    if "t1" in result.test:
        out["t1 r2"] = result.test["t1"]["r2"]
    return out


def table(rows: list[str], results: dict[str, dict[str, list[float]]]) -> str:
    """The Markdown table of one batch mode (``results[label][metric]``: one value per seed)."""
    alone = results["t2 alone"]["t2 r2"]
    lines = [
        "| sampler | t2 test R² ↑ | t2 R² − t2 alone (paired) ↑ | t2 test RMSE ↓ | t1 test R² ↑ "
        "| t2 share of samples |",
        "|---|---|---|---|---|---|",
    ]
    for label in rows:
        r = results[label]
        t1 = spread(r["t1 r2"]) if "t1 r2" in r else "—"
        gain = [a - b for a, b in zip(r["t2 r2"], alone, strict=True)]
        share = statistics.fmean(r["share"])
        lines.append(
            f"| {label} | {spread(r['t2 r2'])} | {spread(gain)} | {spread(r['t2 rmse'])} "
            f"| {t1} | {share:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--large", type=int, default=20_000, help="training samples of t1")
    parser.add_argument("--small", type=int, default=200, help="training samples of t2")
    parser.add_argument("--correlation", type=float, default=0.9)
    parser.add_argument("--input-dim", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["mixed", "single"], help="batch modes")
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default: temporary)")
    parser.add_argument("--markdown", type=Path, default=ROOT / "benchmarks/results/sampling.md")
    args = parser.parse_args()
    torch.set_num_threads(1)

    labels = [label for label, _ in SAMPLERS]
    results: dict[str, dict[str, dict[str, list[float]]]] = {mode: {} for mode in args.modes}
    alone: dict[str, list[float]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        output = args.runs or Path(tmp)
        for seed in range(args.seeds):
            runs = [(label, sampler, mode) for mode in args.modes for label, sampler in SAMPLERS]
            runs.append(("t2 alone", None, args.modes[0]))
            for label, sampler, mode in runs:
                got = train_one(run_config(label, sampler, mode, seed, args, output))
                target = alone if sampler is None else results[mode].setdefault(label, {})
                for key, value in got.items():
                    target.setdefault(key, []).append(value)
                print(
                    f"seed {seed}  {mode:6s} {label:16s} t2 R² {got['t2 r2']:.3f}  "
                    f"rmse {got['t2 rmse']:.3f}  t2 share {got['share']:.3f}  "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    elapsed = time.perf_counter() - started

    settings = (
        f"{args.seeds} seed(s); t1: {args.large:,} training samples, t2: {args.small:,} (and "
        f"2,000 test samples); correlation {args.correlation:g}, {args.input_dim} input "
        f"dimensions; {args.epochs} epochs of {steps_per_epoch(args)} batches of "
        f"{args.batch_size}; fixed mix t1:t2 = {FIXED_WEIGHTS[0]:g}:{FIXED_WEIGHTS[1]:g}; "
        f"{elapsed / 60:.1f} min on {torch.get_num_threads()} thread(s)"
    )
    parts = [
        "# Samplers for a large and a small related task (100:1)\n",
        f"Mean ± std over seeds; {settings}. Produced by `benchmarks/sampling.py`; `t2 alone` "
        "is the small dataset on its own for the same number of steps.\n",
    ]
    for mode in args.modes:
        results[mode]["t2 alone"] = alone
        text = table([*labels, "t2 alone"], results[mode])
        best = max(labels, key=lambda x: statistics.fmean(results[mode][x]["t2 r2"]))
        parts.append(f"## batch_mode: {mode}\n\n{text}\n\nHighest mean t2 test R²: **{best}**.\n")
        print(f"\nbatch_mode {mode}\n{text}")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text("\n".join(parts))
    print(f"\nwrote {args.markdown}")


if __name__ == "__main__":
    main()
