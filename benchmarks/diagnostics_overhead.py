"""What gradient-conflict diagnostics cost: training steps with ``balancing.diagnostics.every``
= N against the same steps with diagnostics off.

For each shipped recipe and balancing method, one Trainer (the recipe's model, data and batch
size) runs blocks of optimizer steps over the same fixed batches, alternately with diagnostics
off and on (every N steps, the values read once per block as at an epoch's end); the table gives
the median time per step of each, and the overhead as the median of the paired ratios (each
block "on" against the "off" block next to it, in alternating order, so drifts in machine load
hit both). A second
figure, the cost of one observed step against a plain one (blocks with ``every = 1``), predicts
the overhead at N without the noise: ``(ratio − 1) / N``.

On the CPU the time is the process's CPU time (one thread), which a machine shared with other
jobs disturbs much less than the wall clock; on CUDA it is the wall clock after a synchronize.

    python benchmarks/diagnostics_overhead.py [--device cpu|cuda] [--every 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from polytask.config import RunConfig
from polytask.data.batches import Batch
from polytask.io import write_text_atomic
from polytask.run.build import build_balancer_for, build_model_for, build_optimization
from polytask.run.data import build_data, move_to_device, train_batches
from polytask.run.recipes import load_recipe
from polytask.runtime import Runtime
from polytask.train.trainer import Trainer

RESULTS = Path(__file__).parent / "results"
CASES = [  # (recipe, method): a loss weighting, a Gramian weighting, a projection method
    ("mmoe-synthetic", "equal"),
    ("mmoe-synthetic", "upgrad"),
    ("mmoe-synthetic", "pcgrad"),
    ("multi-digits", "uncertainty"),
    ("multi-digits", "upgrad"),
    ("multi-digits", "pcgrad"),
]


def make_trainer(config: RunConfig, device: torch.device) -> tuple[Trainer, list[Batch]]:
    """The recipe's Trainer (no run folder, no progress bar) and 50 of its training batches."""
    torch.manual_seed(config.seed)
    bundle = build_data(config)
    move_to_device(bundle, config, device)
    model = build_model_for(config, bundle.tasks, bundle.input_shape)
    balancer = build_balancer_for(config, bundle.tasks)
    loader = train_batches(config, bundle, rank=0, world_size=1)
    model.to(device)
    balancer.to(device)
    optimizer, scheduler = build_optimization(config, model, balancer, steps_per_epoch=len(loader))
    trainer = Trainer(
        model,
        balancer,
        bundle.tasks,
        optimizer=optimizer,
        scheduler=None,
        train_batches=loader,
        val_batches=None,
        epochs=1,
        runtime=Runtime(device),
        progress=False,
    )
    del scheduler  # a constant rate: the schedule is not what is measured
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 50:
            break
    return trainer, batches


def clock(device: torch.device) -> float:
    """CPU time of this process on the CPU; wall time after a synchronize on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def block(trainer: Trainer, batches: Sequence[Batch], steps: int, every: int) -> float:
    """Seconds per optimizer step over ``steps`` steps with diagnostics every ``every``."""
    trainer.diagnostics.every = every
    trainer.model.train()
    start = clock(trainer.device)
    for i in range(steps):
        trainer.train_step([batches[i % len(batches)]])
    trainer.diagnostics.end_epoch()  # the one read per epoch
    return (clock(trainer.device) - start) / steps


def measure(recipe: str, method: str, args: argparse.Namespace) -> str:
    config = load_recipe(recipe, [f"balancing.method={method}"])
    trainer, batches = make_trainer(config, torch.device(args.device))
    block(trainer, batches, 20, 0)  # warm-up both paths
    block(trainer, batches, 5, 1)
    off, on, ratios = [], [], []
    for repeat in range(args.repeats):
        times = {}
        for every in (0, args.every) if repeat % 2 == 0 else (args.every, 0):  # both orders
            trainer.step = 0  # every block sees the same observed steps: 0, N, 2N...
            times[every] = block(trainer, batches, args.steps, every)
        a, b = times[0], times[args.every]
        off.append(a)
        on.append(b)
        ratios.append(b / a)
    plain, observed = [], []
    for repeat in range(args.repeats):
        if repeat % 2:
            observed.append(block(trainer, batches, 10, 1))
        plain.append(block(trainer, batches, 10, 0))
        if not repeat % 2:
            observed.append(block(trainer, batches, 10, 1))
    step_ratio = statistics.median(o / p for o, p in zip(observed, plain, strict=True))
    overhead = 100 * (statistics.median(ratios) - 1)
    predicted = 100 * (step_ratio - 1) / args.every
    k = len(trainer.tasks)
    return (
        f"| {recipe} | {method} | {k} | {1000 * statistics.median(off):.2f} | "
        f"{1000 * statistics.median(on):.2f} | {overhead:+.2f}% | {step_ratio:.2f}× | "
        f"{predicted:+.2f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="recipes to measure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [c for c in CASES if args.only is None or c[0] in args.only]
    rows = []
    for recipe, method in cases:
        rows.append(measure(recipe, method, args))
        print(rows[-1], flush=True)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    table = "\n".join(
        [
            f"# Gradient diagnostics overhead ({name}, torch {torch.__version__}{threads})",
            "",
            f"Recipe model, data and batch size; blocks of {args.steps} optimizer steps over 50 "
            f"fixed batches, diagnostics off and every {args.every} steps interleaved, "
            f"{args.repeats} repeats; step times are medians ("
            + ("CPU time of the process" if device.type == "cpu" else "wall clock")
            + "). "
            + (
                "The machine (2 cores) was shared with other jobs while this ran: the "
                "single-block figures are noisy, the paired ratios and the per-step figure less so."
                if device.type == "cpu"
                else "A dedicated GPU machine."
            ),
            "",
            f"| recipe | method | K | ms/step off | ms/step every {args.every} | overhead "
            "(paired median) | observed step / plain step | predicted overhead |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"*predicted overhead*: (observed step / plain step − 1) / {args.every}. A gradient "
            "method forms the task-gradient Gramian anyway and hands it over "
            "(`geometry_observer`), so an observed step costs about a plain one; a loss "
            "weighting computes the per-task Jacobian of the shared parameters on that step "
            "only.",
        ]
    )
    print()
    print(table)
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    out = RESULTS / f"diagnostics_overhead{suffix}.md"
    write_text_atomic(out, table + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
