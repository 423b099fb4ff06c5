"""Balancing methods on dense tasks: ``polytask compare`` of the ``dense-shapes`` recipe.

The packaged recipe (32×32 scenes, ``dense_cnn`` + three ``dense`` heads: segmentation, depth,
surface normals) trained with each balancing method, plus the three single-task baselines, and
ranked by Δm% — each metric signed by its direction (lower is better for the depth errors and
the angles, higher for mIoU, pixel accuracy and the within-X° shares). The same as

    polytask init dense-shapes            # then set train.epochs in dense-shapes.yaml
    polytask compare dense-shapes.yaml --methods equal,uncertainty,dwa,pcgrad,cagrad --seeds 1

with the recipe's epochs reduced (``--epochs``) so that it fits about 20 minutes of a small CPU.
CPU only; the machine is shared with other work, so the seconds are indicative only.

    .venv/bin/python benchmarks/compare_dense_shapes.py                 # 4 epochs, 1 seed
    .venv/bin/python benchmarks/compare_dense_shapes.py --epochs 1 --methods equal,dwa  # quick
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from polytask.io import write_text_atomic  # noqa: E402
from polytask.run.experiments import (  # noqa: E402
    compare_methods,
    comparison_table,
    write_comparison,
)
from polytask.run.recipes import load_recipe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="equal,uncertainty,dwa,pcgrad,cagrad")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=4, help="instead of the recipe's 8")
    parser.add_argument("--output-dir", type=Path, default=None, help="where the runs go")
    parser.add_argument("--name", default="compare_dense_shapes", help="results file stem")
    parser.add_argument(
        "--set", nargs="*", default=[], help="more key=value overrides of the recipe"
    )
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    config = load_recipe("dense-shapes", [f"train.epochs={args.epochs}", *args.set])
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or Path(scratch)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        comparison = compare_methods(
            config, methods, seeds=args.seeds, output_dir=output_dir, progress=False
        )
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    table = comparison_table(comparison)
    print(table)
    markdown = RESULTS / f"{args.name}.md"
    write_comparison(comparison, markdown=None, csv_path=RESULTS / f"{args.name}.csv", plot=None)
    overrides = "".join(f" --set {o}" for o in args.set)
    runs = len(methods) * args.seeds + len(comparison.tasks)
    text = (
        f"# dense-shapes: balancing methods on dense tasks (seeds "
        f"{', '.join(map(str, comparison.seeds))})\n\n"
        f"`.venv/bin/python benchmarks/compare_dense_shapes.py --methods {','.join(methods)} "
        f"--seeds {args.seeds} --epochs {args.epochs}{overrides}`: the `dense-shapes` recipe "
        f"(1,200 scenes of 32×32, `dense_cnn` + `dense` heads, hard sharing) with `train.epochs="
        f"{args.epochs}` (the recipe has 8), each method, and the single-task baselines.\n\n"
        f"{runs} runs in {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU, on a 2-core CPU "
        f"shared with other jobs (no GPU).\n\n"
        "Δm% averages the signed relative gain of all 9 metrics over the single-task baseline: "
        "lower is better for `abs_err`, `rel_err`, `mean_angle` and `median_angle`, higher for "
        "`miou`, `pixel_accuracy` and the `within_*` shares. A metric whose baseline is 0 is "
        "left out of the average.\n\n"
        f"{table}\n"
    )
    write_text_atomic(markdown, text)
    print(f"wrote {markdown} ({wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU)")


if __name__ == "__main__":
    main()
