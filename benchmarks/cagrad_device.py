"""CAGrad's dual solve on the Gramian's device against the NumPy solver on the CPU.

For K in ``--k`` (default 10 and 40), a random K×P Jacobian (P = 1000, float32, one pair of rows
in conflict) on the device, its Gramian ``G = J Jᵀ``, and ``cagrad_weights(G, c=0.4)`` with
``solver="numpy"`` (G copied to the host, float64 NumPy, weights copied back) and
``solver="torch"`` (``conflict_averse_coefficients`` on the device; on CUDA its steps fused by
``torch.compile`` and replayed from a captured CUDA graph) and, on CUDA, the same torch solve
from a graph of the uncompiled steps and run eagerly (no graph), with MGDA's
``min_norm_simplex`` (a NumPy solve like the other Gramian methods') for scale. Times are
medians over ``--repeats`` interleaved rounds of ``--calls`` calls each (synchronised on CUDA);
*max abs Δw* is the largest difference between the torch and NumPy weights. On CUDA the torch
solve also runs under ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation in
it raises, and the table says ``none`` only when it did not.

Usage:
    python benchmarks/cagrad_device.py [--device cuda] [--k 10 40] [--repeats 7] [--calls 10]

Prints the table and writes ``benchmarks/results/cagrad_device_<device>.md`` (or ``--output``).
Not a test: timings on a shared machine are noisy, so only ratios within one run are compared.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from polytask.balancing.aggregation._cagrad import cagrad_weights
from polytask.balancing.solvers import min_norm_simplex
from polytask.balancing.solvers.conflict_averse import (
    _coefficients,
    _graphed,
    device_solve_dtype,
)
from polytask.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def _gramian(k: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(k)
    j = torch.randn(k, 1000, generator=gen)
    j[1] = -0.8 * j[0] + 0.3 * j[1]  # a strong conflict
    j = j.to(device)
    return j @ j.T


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_variant(g: torch.Tensor, how: str) -> torch.Tensor:
    """The torch solve without the CUDA graph (``eager``: the same kernels launched one by one)
    or from a graph of the uncompiled steps (``graph``)."""
    dtype = device_solve_dtype(g.device)
    g64 = g.to(dtype)
    k = g.shape[0]
    center = torch.full((k,), 1.0 / k, dtype=dtype, device=g.device)
    radius = 0.4 * g64.mean().clamp_min(0).sqrt()
    if how == "graph":
        return (center + _graphed(g64, center, radius, compiled=False)) / 1.16
    return (center + _coefficients(g64, center, radius)) / 1.16


def _median_ms(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls * 1e3


def _sync_check(g: torch.Tensor) -> str:
    if g.device.type != "cuda":
        return "n/a (no CUDA)"
    cagrad_weights(g, c=0.4, solver="torch")  # capture outside the check
    torch.cuda.synchronize(g.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        cagrad_weights(g, c=0.4, solver="torch")
    except RuntimeError as error:
        return f"SYNC: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "none"


def measure(k: int, device: torch.device, repeats: int, calls: int) -> dict[str, float | str]:
    """Median ms per call of each solve, the largest weight difference and the sync check."""
    g = _gramian(k, device)
    variants: dict[str, Callable[[], object]] = {
        "numpy": lambda: cagrad_weights(g, c=0.4, solver="numpy"),
        "torch": lambda: cagrad_weights(g, c=0.4, solver="torch"),
        "mgda (numpy)": lambda: min_norm_simplex(g),
    }
    if device.type == "cuda":
        variants["torch, graph not compiled"] = lambda: _torch_variant(g, "graph")
        variants["torch eager"] = lambda: _torch_variant(g, "eager")
    for name, fn in variants.items():  # warm-up (and CUDA graph capture, compilation)
        start = time.perf_counter()
        fn()
        print(f"K={k} {name}: first call {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            times[name].append(_median_ms(variants[name], calls, device))
    out: dict[str, float | str] = {name: statistics.median(t) for name, t in times.items()}
    numpy_w = cagrad_weights(g, c=0.4, solver="numpy").double().cpu()
    torch_w = cagrad_weights(g, c=0.4, solver="torch").double().cpu()
    out["max abs Δw"] = float((numpy_w - torch_w).abs().max())
    out["host sync in torch solve"] = _sync_check(g)
    return out


def table(results: dict[int, dict[str, float | str]]) -> list[str]:
    columns = list(next(iter(results.values())))
    lines = ["| K | " + " | ".join(columns) + " |", "| ---: |" + " ---: |" * len(columns)]
    for k, row in results.items():
        cells = [
            f"{v:.3g} ms"
            if isinstance(v, float) and "Δ" not in name
            else f"{v:.2g}"
            if isinstance(v, float)
            else str(v)
            for name, v in row.items()
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {k: measure(k, device, args.repeats, args.calls) for k in args.k}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    header = [
        f"# CAGrad's dual solve: torch on the device vs NumPy on the CPU ({device.type})",
        "",
        f"- device: {name or device.type}; torch {torch.__version__}; "
        f"{torch.get_num_threads()} CPU threads; Python {platform.python_version()}",
        f"- command: `python benchmarks/cagrad_device.py --device {args.device} --k "
        f"{' '.join(map(str, args.k))} --repeats {args.repeats} --calls {args.calls}`; "
        f"{time.strftime('%Y-%m-%d')}",
        "- medians of interleaved rounds; the machine may be shared with other work (noise "
        "hits every variant alike within a round)",
        "",
    ]
    text = "\n".join([*header, *table(results), ""])
    print(text)
    output = args.output or ROOT / "benchmarks" / "results" / f"cagrad_device_{device.type}.md"
    write_text_atomic(output, text)


if __name__ == "__main__":
    main()
