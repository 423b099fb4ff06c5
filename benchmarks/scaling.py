"""Data-parallel scaling: Trainer throughput with 1 and N processes (torchrun + DDP).

Each configuration trains the same MLP (as in ``overhead.py``) with the global batch split over
the processes (per-process batch = global / N) and reports rank 0's samples/s. Equal weighting
uses DDP's own bucketed all-reduce of the gradient (P values per step); a gradient method
(``--methods``) all-reduces the K×P per-task Jacobian instead (K times the bytes), so the table
shows what exact gradient balancing costs at scale.

    python benchmarks/scaling.py [--procs 1 2] [--methods equal mgda] [--samples 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(args: argparse.Namespace) -> None:
    import torch

    from polytask.balancing import build_balancer
    from polytask.data.batches import BatchLoader, MultiLabelDataset
    from polytask.runtime import Runtime, shutdown_distributed
    from polytask.train.trainer import Trainer

    sys.path.insert(0, str(Path(__file__).parent))
    import overhead

    torch.set_num_threads(args.threads)
    runtime = Runtime.start("cpu")
    x, y = overhead.make_data(args.samples, 256, torch.device("cpu"))
    per_process = args.batch // runtime.world_size
    model = overhead.make_model(256, torch.device("cpu"))
    balancer = build_balancer(args.method, overhead.TASKS)
    trainer = Trainer(
        model,
        balancer,
        overhead.TASKS,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        scheduler=None,
        train_batches=BatchLoader(
            MultiLabelDataset(x, y),
            per_process,
            shuffle=True,
            rank=runtime.rank,
            world_size=runtime.world_size,
        ),
        val_batches=None,
        epochs=args.epochs,
        runtime=runtime,
        progress=False,
    )
    runtime.barrier()
    start = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - start
    if runtime.is_main:
        Path(args.out).write_text(
            json.dumps({"samples_per_s": args.epochs * args.samples / elapsed})
        )
    shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=["equal", "mgda"])
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="equal", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    base: dict[str, float] = {}
    for method in args.methods:
        for n in args.procs:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "result.json"
                command = [
                    sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={n}", __file__, "--worker", f"--method={method}",
                    f"--samples={args.samples}", f"--batch={args.batch}",
                    f"--epochs={args.epochs}", f"--threads={args.threads}", f"--out={out}",
                ]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                subprocess.run(command, check=True, env=env, capture_output=True)
                speed = json.loads(out.read_text())["samples_per_s"]
            base.setdefault(method, speed)
            rows.append((method, n, speed, speed / base[method]))
            print(f"{method:8s} {n} process(es): {speed:,.0f} samples/s")
    table = "\n".join(
        [
            f"# Data-parallel scaling on CPU (gloo, {args.threads} thread(s) per process)",
            "",
            f"MLP 256→1024→1024→256, 3 tasks, global batch {args.batch}, {args.samples} samples "
            f"× {args.epochs} epochs.",
            "",
            "| method | processes | samples/s | speed-up |",
            "|---|---|---|---|",
            *[f"| {m} | {n} | {s:,.0f} | {r:.2f}× |" for m, n, s, r in rows],
        ]
    )
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling_cpu.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
