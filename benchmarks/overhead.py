"""Framework overhead: polytask's Trainer against a minimal hand-written PyTorch loop.

The same model (an MLP trunk and three heads), data, optimizer and batch size are trained
(a) by the loop a user would write by hand (shuffle, slice, forward, sum of losses, backward,
step) and (b) by ``polytask.train.Trainer`` with equal weighting (masked per-task losses, the
balancer, the scheduler, on-device running sums). Each is timed over whole epochs, repeated;
the table gives the median samples/s and the Trainer's share of time waiting for data.

    python benchmarks/overhead.py [--device cpu|cuda] [--batch-size 256 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from polytask.balancing import build_balancer
from polytask.data.batches import BatchLoader, MultiLabelDataset
from polytask.io import write_text_atomic
from polytask.models import build_model
from polytask.runtime import Runtime
from polytask.tasks import TaskSpec
from polytask.train.trainer import Trainer

RESULTS = Path(__file__).parent / "results"
TASKS = [
    TaskSpec("reg", "regression"),
    TaskSpec("cls", "multiclass", num_classes=10),
    TaskSpec("bin", "binary"),
]


def make_data(n: int, d: int, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = {
        "reg": x[:, 0] + 0.1 * torch.randn(n, generator=g),
        "cls": (x[:, 1] * 3).long().clamp(-5, 4) + 5,
        "bin": (x[:, 2] > 0).float(),
    }
    return x.to(device), {k: v.to(device) for k, v in y.items()}


def make_model(d: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(TASKS, (d,), encoder_params={"hidden": [1024, 1024, 256]})
    return model.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(x, y, *, batch: int, epochs: int, device: torch.device) -> float:
    """Samples/s of the minimal loop (the reference)."""
    model = make_model(x.shape[1], device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = x.shape[0]
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, device=device)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            out = model(x[idx]).outputs
            loss = (
                F.mse_loss(out["reg"], y["reg"][idx])
                + F.cross_entropy(out["cls"], y["cls"][idx])
                + F.binary_cross_entropy_with_logits(out["bin"], y["bin"][idx])
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync(device)
    return epochs * n / (time.perf_counter() - start)


def trainer_loop(
    x, y, *, batch: int, epochs: int, device: torch.device, cuda_graph: bool = False
) -> tuple[float, float]:
    """Samples/s of polytask's Trainer (its step replayed from a CUDA graph with
    ``cuda_graph``), and its data-wait fraction."""
    model = make_model(x.shape[1], device)
    balancer = build_balancer("equal", TASKS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = BatchLoader(MultiLabelDataset(x, y), batch, shuffle=True, seed=0)
    trainer = Trainer(
        model,
        balancer,
        TASKS,
        optimizer=opt,
        scheduler=None,
        train_batches=loader,
        val_batches=None,
        epochs=epochs,
        runtime=Runtime(device),
        progress=False,
        cuda_graph=cuda_graph,
    )
    sync(device)
    start = time.perf_counter()
    result = trainer.fit()
    sync(device)
    elapsed = time.perf_counter() - start
    wait = statistics.mean(r["data_wait_fraction"] for r in result.history)
    return epochs * x.shape[0] / elapsed, wait


def measure(x, y, *, batch: int, args: argparse.Namespace, device: torch.device) -> list[str]:
    """Interleaved repeats of both loops at one batch size: one table row each."""
    variants = {"polytask Trainer (equal)": False}
    if device.type == "cuda":
        variants["polytask Trainer (equal), train.cuda_graph"] = True
    hand_loop(x, y, batch=batch, epochs=1, device=device)  # warm-up every path
    for graph in variants.values():
        trainer_loop(x, y, batch=batch, epochs=1, device=device, cuda_graph=graph)
    hand: list[float] = []
    ours: dict[str, list[float]] = {name: [] for name in variants}
    waits: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved so drifts in machine load hit every loop
        hand.append(hand_loop(x, y, batch=batch, epochs=args.epochs, device=device))
        for name, graph in variants.items():
            speed, wait = trainer_loop(
                x, y, batch=batch, epochs=args.epochs, device=device, cuda_graph=graph
            )
            ours[name].append(speed)
            waits[name].append(wait)
    h = statistics.median(hand)
    rows = [
        f"| {batch} | hand-written | {h:,.0f} | {min(hand):,.0f} | {max(hand):,.0f} | 100.0% | — |"
    ]
    for name, speeds in ours.items():
        o = statistics.median(speeds)
        rows.append(
            f"| {batch} | {name} | {o:,.0f} | {min(speeds):,.0f} | {max(speeds):,.0f} | "
            f"{100 * o / h:.1f}% | {100 * statistics.median(waits[name]):.2f}% |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument(
        "--batch-size",
        "--batch",
        dest="batch",
        type=int,
        nargs="+",
        default=[256],
        help="one or more batch sizes (a pair of rows each)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    x, y = make_data(args.samples, args.features, device)
    rows = [
        row for batch in args.batch for row in measure(x, y, batch=batch, args=args, device=device)
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = "\n".join(
        [
            f"# Trainer overhead ({name}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)",
            "",
            f"MLP {args.features}→1024→1024→256, 3 heads, {args.samples} samples × "
            f"{args.epochs} epochs, median of {args.repeats} interleaved repeats.",
            "",
            "| batch | loop | samples/s (median) | min | max | relative | data wait |",
            "|---:|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "*data wait*: the Trainer's time waiting for data, share of the training time "
            "(median over repeats).",
        ]
    )
    print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"overhead_{device.type}.md"
    write_text_atomic(out, table + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
