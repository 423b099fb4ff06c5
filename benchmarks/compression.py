"""Compression benchmark: fp32 / fp16 / int8 ONNX, a pruned (50%, one fine-tuning epoch) and a
distilled (half-width student) model of three recipes — size on disk, CPU latency at batch 1 and
256 (onnxruntime, one thread), and every task's test metric with its drop from fp32.

Every variant is run by the torch-free runtime (``OnnxPredictor``) on the raw test rows of the
run's own split; metrics: accuracy (multiclass), AUC (binary), RMSE in original units
(regression). Target: int8 within 1 accuracy point, 0.005 AUC or 2% RMSE of fp32 on every task,
at most 35% of the fp32 file size.

    python benchmarks/compression.py            # ~10 min on 2 shared cores
    python benchmarks/compression.py --quick    # smaller data and fewer epochs (a smoke run)

Writes ``benchmarks/results/compression.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from polytask.data.bundle import split_rows
from polytask.run.data import dataset_entries, dataset_tables
from polytask.run.distill import distill_run
from polytask.run.folder import load_trained
from polytask.run.recipes import load_recipe
from polytask.run.single import train_run
from polytask.serve.compress import prune_run
from polytask.serve.export import export_onnx, request_columns, table_rows
from polytask.serve.onnx_runtime import OnnxPredictor

RESULTS = Path(__file__).parent / "results" / "compression.md"
#: recipe → overrides (full, quick): shorter than the recipes' own runs, so the whole benchmark
#: takes minutes on a shared 2-core machine
RECIPES: dict[str, tuple[list[str], list[str]]] = {
    "multi-digits": (
        [
            "data.params.num_train=4000",
            "data.params.num_val=800",
            "data.params.num_test=1500",
            "train.epochs=4",
        ],
        [
            "data.params.num_train=600",
            "data.params.num_val=200",
            "data.params.num_test=300",
            "train.epochs=1",
        ],
    ),
    "students-csv": ([], ["train.epochs=3"]),
    "recsys-mmoe": (["train.epochs=4"], ["data.params.num_impressions=4000", "train.epochs=1"]),
}
VARIANTS = ("fp32", "fp16", "int8", "pruned", "distilled")


# ----------------------------------------------------------------------------- test data
def test_rows(config: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """The run's test split: raw inputs (as the table holds them) and labels per task."""
    tables, _ = dataset_tables(dataset_entries(config), seed=config.seed)
    table = tables[0][1]
    index = split_rows(
        table,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.seed,
    )["test"]
    raw = table_rows(table.inputs, index)
    return raw, {task: np.asarray(y)[index] for task, y in table.targets.items()}


# ----------------------------------------------------------------------------- metrics
def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties averaged)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def task_metric(
    kind: str, labels: np.ndarray, outputs: np.ndarray, label: np.ndarray | None
) -> tuple[str, float]:
    """(metric name, value) of one task on its labelled rows."""
    if kind == "multiclass":
        keep = labels >= 0
        assert label is not None
        return "accuracy", float((label[keep] == labels[keep]).mean())
    if kind == "binary":
        keep = np.isfinite(labels) & (labels >= 0)
        return "auc", auc(labels[keep], outputs[keep])
    keep = np.isfinite(labels) if labels.ndim == 1 else np.isfinite(labels).all(axis=1)
    return "rmse", float(np.sqrt(np.mean((outputs[keep] - labels[keep]) ** 2)))


def metrics_of(
    predictor: OnnxPredictor, columns: dict[str, Any], labels: dict[str, np.ndarray]
) -> dict[str, tuple[str, float]]:
    outputs = predictor.run(columns)
    return {
        t.name: task_metric(
            t.kind, labels[t.name], outputs[t.output], outputs.get(f"{t.output}.label")
        )
        for t in predictor.tasks
        if t.kind in ("multiclass", "binary", "regression")
    }


# ----------------------------------------------------------------------------- latency
def latencies(
    models: dict[str, Path], columns: dict[str, Any], *, repeats: int = 7
) -> dict[str, dict[int, float]]:
    """Milliseconds per graph run at batch 1 and 256, the best of ``repeats`` interleaved
    repeats (the least disturbed by other jobs, as ``timeit`` advises; inputs prepared
    beforehand, one onnxruntime thread)."""
    sessions = {}
    for name, path in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        predictor = OnnxPredictor(path)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rows = len(next(iter(columns.values())))
        feeds = {}
        for batch in (1, 256):
            index = np.arange(batch) % rows
            feeds[batch] = predictor.feeds(
                {
                    k: (np.asarray(v)[index] if not isinstance(v, list) else [v[i] for i in index])
                    for k, v in columns.items()
                }
            )
        sessions[name] = (session, feeds)
    times: dict[str, dict[int, list[float]]] = {n: {1: [], 256: []} for n in models}
    for _ in range(repeats):
        for name, (session, feeds) in sessions.items():
            for batch, calls in ((1, 200), (256, 10)):
                session.run(None, feeds[batch])  # warm
                start = time.perf_counter()
                for _ in range(calls):
                    session.run(None, feeds[batch])
                times[name][batch].append((time.perf_counter() - start) / calls * 1e3)
    return {n: {b: min(v) for b, v in per.items()} for n, per in times.items()}


# ----------------------------------------------------------------------------- one recipe
def benchmark_recipe(recipe: str, overrides: list[str], folder: Path) -> dict[str, Any]:
    config = load_recipe(recipe, [*overrides, "train.progress=false", f"output_dir={folder}"])
    print(f"[{recipe}] training the fp32 model", flush=True)
    teacher = train_run(config).run_dir
    out = folder / f"{recipe}-onnx"
    models = {
        "fp32": export_onnx(teacher, out / "fp32.onnx").model_path,
        "fp16": export_onnx(teacher, out / "fp16.onnx", quantize="fp16").model_path,
        "int8": export_onnx(teacher, out / "int8.onnx", quantize="int8").model_path,
    }
    print(f"[{recipe}] pruning 50% + one fine-tuning epoch", flush=True)
    pruned = prune_run(teacher, 0.5, progress=False).run_dir
    models["pruned"] = export_onnx(pruned, out / "pruned.onnx").model_path
    print(f"[{recipe}] distilling a half-width student", flush=True)
    student = distill_run(teacher, "half", progress=False).run_dir
    models["distilled"] = export_onnx(student, out / "distilled.onnx").model_path
    trained = load_trained(teacher)
    raw, labels = test_rows(config)
    columns = request_columns(trained, raw)
    metrics = {n: metrics_of(OnnxPredictor(p), columns, labels) for n, p in models.items()}
    print(f"[{recipe}] timing", flush=True)
    return {
        "models": models,
        "sizes": {n: p.stat().st_size for n, p in models.items()},
        "metrics": metrics,
        "latency": latencies(models, columns),
        "rows": len(next(iter(labels.values()))),
    }


def drop(metric: str, base: float, value: float) -> str:
    """The change from fp32: relative for RMSE, points for accuracy, absolute for AUC."""
    if metric == "rmse":
        return f"{(value - base) / base * 100:+.2f}%"
    if metric == "accuracy":
        return f"{(value - base) * 100:+.1f} pt"
    return f"{value - base:+.4f}"


def int8_verdict(result: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether int8 meets the targets, and what misses them."""
    misses = []
    ratio = result["sizes"]["int8"] / result["sizes"]["fp32"]
    if ratio > 0.35:
        misses.append(f"size {ratio:.0%} of fp32 (> 35%)")
    for task, (metric, base) in result["metrics"]["fp32"].items():
        value = result["metrics"]["int8"][task][1]
        limit = {"accuracy": 0.01, "auc": 0.005}.get(metric)
        if metric == "rmse":
            if (value - base) / base > 0.02:
                misses.append(f"{task} RMSE {value:.4g} vs {base:.4g} (> +2%)")
        elif base - value > limit:  # type: ignore[operator]
            misses.append(f"{task} {metric} {value:.4f} vs {base:.4f} (drop > {limit})")
    return not misses, misses


def table(recipe: str, result: dict[str, Any]) -> str:
    tasks = list(result["metrics"]["fp32"])
    head = ["variant", "size (KiB)", "size vs fp32", "batch 1 (ms)", "batch 256 (ms)"]
    head += [f"{t} ({result['metrics']['fp32'][t][0]})" for t in tasks]
    lines = [
        f"### {recipe} ({result['rows']} test rows)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    base_size = result["sizes"]["fp32"]
    for variant in VARIANTS:
        cells = [
            variant,
            f"{result['sizes'][variant] / 1024:.0f}",
            f"{result['sizes'][variant] / base_size:.0%}",
            f"{result['latency'][variant][1]:.3f}",
            f"{result['latency'][variant][256]:.2f}",
        ]
        for task in tasks:
            metric, value = result["metrics"][variant][task]
            base = result["metrics"]["fp32"][task][1]
            cells.append(
                f"{value:.4f}"
                if variant == "fp32"
                else f"{value:.4f} ({drop(metric, base, value)})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    met, misses = int8_verdict(result)
    lines += ["", "int8 target " + ("**met**." if met else "**not met**: " + "; ".join(misses))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer epochs")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections = []
    with tempfile.TemporaryDirectory(prefix="polytask-compression-") as tmp:
        for recipe in args.recipes:
            full, quick = RECIPES[recipe]
            result = benchmark_recipe(recipe, quick if args.quick else full, Path(tmp))
            sections.append(table(recipe, result))
            print(sections[-1], flush=True)
    intro = [
        "# Compression: fp32 / fp16 / int8 ONNX, pruned, distilled",
        "",
        f"`python benchmarks/compression.py{' --quick' if args.quick else ''}` "
        f"(torch {torch.__version__}, onnxruntime {ort.__version__}, Python "
        f"{sys.version.split()[0]}). Each recipe is trained with the overrides in "
        "`RECIPES` (fewer epochs and samples than the recipe itself); fp32 is the dynamo "
        "export; fp16 halves weights and arithmetic (float32 inputs and outputs); int8 is "
        "onnxruntime's dynamic quantization (int8 weights of MatMul/Gemm and Conv, activations "
        "quantized per batch; onnxruntime's ConvInteger has no fast CPU kernel, hence the "
        "slower int8 CNN); "
        "pruned zeroes 50% of the Linear/Conv weights (global magnitude) and fine-tunes one "
        "epoch at 0.1x the learning rate (stored dense: the zeros do not shrink the file); "
        "distilled is a half-width student (`polytask distill --student half`, T=2, alpha=0.5) "
        "trained as long as the teacher. Metrics on the run's test split through the torch-free "
        "runtime: accuracy (multiclass), AUC (binary), RMSE in original units (regression); "
        "the drop is against fp32 (points for accuracy, absolute for AUC, relative for RMSE). "
        "Latency: one graph run with prepared inputs (the runtime's preprocessing excluded), "
        "one onnxruntime thread, the best of 7 interleaved repeats (200 calls at batch 1, 10 at "
        "256), on a 2-core machine **shared with other jobs** (noisy: compare ratios within a "
        "table, not across runs). Target: int8 within 1 accuracy point / "
        "0.005 AUC / 2% RMSE of fp32 on every task at <= 35% of its size.",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(intro) + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
