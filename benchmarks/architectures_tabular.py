"""Architectures on tabular multi-task data: single-task vs shared-bottom vs MMoE vs PLE (and
ESMM on the click/conversion log), AUC per task over seeds, parameters and step time.

Datasets:

* ``yeast`` — real (Elisseeff & Weston, NIPS 2001; shipped in ``river``): 2,417 genes,
  103 numeric features, 14 binary gene-function tasks; ``mlp`` encoders.
* ``recsys-synthetic`` — the generated impression log (``polytask.data.sources.recsys``):
  ``click`` and ``conversion`` (click and convert) over every impression; ``tabular`` encoders
  (categorical embeddings + numeric features); AUC, GAUC by user and log-loss
  (``polytask.ranking``).

Models at equal expert width: the shared bottom has one 64-unit hidden layer; MMoE has 4 experts
of 16 units (64 in all); PLE has two extraction levels with one 16-unit expert per task and two
shared ones (with 14 tasks that is 16 experts: more parameters, see the table); ESMM shares the
shared bottom's encoder; single-task trains one shared-bottom-shaped model per task (the
``evaluate.baselines`` of polytask). Every task has a tower (an ``mlp`` head with 8 units). Each
run goes through ``polytask.run.train_with_baselines``; the tables use
``polytask.evaluate.summarize_groups`` / ``comparison_markdown`` (the format of
``polytask compare --markdown``).

Step time: the median wall time of one training step (forward, every task's loss, backward,
AdamW step) on one training batch, after warm-up, on one CPU thread, the models taking turns so
that other load on the machine slows them alike; single-task is one step of each of its per-task
models (what one batch of every task costs).

    .venv/bin/python benchmarks/architectures_tabular.py               # 3 seeds, both datasets
    .venv/bin/python benchmarks/architectures_tabular.py --datasets yeast --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from polytask.config import RunConfig, config_to_dict, parse_config  # noqa: E402
from polytask.data.batches import BatchLoader  # noqa: E402
from polytask.data.bundle import DataBundle, split_indices  # noqa: E402
from polytask.data.preprocess import take_inputs  # noqa: E402
from polytask.data.sources.recsys import generate_log  # noqa: E402
from polytask.evaluate import comparison_markdown, summarize_groups  # noqa: E402
from polytask.evaluate.ranking import auc, group_codes, ranking_report  # noqa: E402
from polytask.run import load_trained, train_with_baselines  # noqa: E402
from polytask.run.build import build_model_for  # noqa: E402
from polytask.run.data import build_data  # noqa: E402
from polytask.tasks import TaskSpec  # noqa: E402

TOWER = {"head": "mlp", "head_params": {"hidden": [8]}}
EXPERT_WIDTH = 16
BOTTOM_WIDTH = 64

DATASETS: dict[str, dict[str, Any]] = {
    "yeast": {
        "data": {"dataset": "yeast", "params": {"as_tasks": "binary"}, "batch_size": 64},
        "encoder": "mlp",
        "encoder_params": {},
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4},
        "epochs": 25,
        "metrics": ["auc"],
        "group": None,
    },
    "recsys-synthetic": {
        "data": {"dataset": "recsys-synthetic", "params": {}, "batch_size": 256},
        "encoder": "tabular",
        "encoder_params": {"crosses": [["user_segment", "item_category"]]},
        "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-5},
        "epochs": 8,
        "metrics": ["auc", "gauc", "log_loss"],
        "group": "user_id",
    },
}


def architectures(dataset: str) -> dict[str, dict[str, Any]]:
    """Label → model section (without the encoder name) of every multi-task model compared."""
    bottom = {"encoder_params": {"hidden": [BOTTOM_WIDTH]}, "architecture": "hard_sharing"}
    out = {
        "shared-bottom": bottom,
        "MMoE": {
            "encoder_params": {"hidden": [EXPERT_WIDTH]},
            "architecture": "mmoe",
            "architecture_params": {"num_experts": BOTTOM_WIDTH // EXPERT_WIDTH},
        },
        "PLE": {
            "encoder_params": {"hidden": [EXPERT_WIDTH]},
            "architecture": "ple",
            "architecture_params": {"num_levels": 2, "experts_per_task": 1, "shared_experts": 2},
        },
    }
    if dataset == "recsys-synthetic":
        out["ESMM"] = {**bottom, "architecture": "esmm"}
    return out


def recipe(
    dataset: str, label: str, seed: int, args: argparse.Namespace, output: Path
) -> RunConfig:
    spec = DATASETS[dataset]
    arch = architectures(dataset)[label]
    data = {**spec["data"], "params": dict(spec["data"]["params"])}
    if dataset == "recsys-synthetic":
        data["params"]["num_impressions"] = args.impressions
    model = {"encoder": spec["encoder"], **TOWER, **arch}
    model["encoder_params"] = {**spec["encoder_params"], **arch.get("encoder_params", {})}
    raw = {
        "name": f"{dataset}-{label.lower()}",
        "seed": seed,
        "output_dir": str(output),
        "data": data,
        "model": model,
        "balancing": {"method": "equal"},
        "optimizer": spec["optimizer"],
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "train": {
            "epochs": args.epochs or spec["epochs"],
            "early_stopping": {"metric": "loss", "patience": 4},
            "progress": False,
        },
    }
    return parse_config(raw, source=f"{dataset}/{label}")


def with_mean(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``metrics`` plus a ``mean`` row: each metric averaged over the tasks."""
    names = {m for per in metrics.values() for m in per}
    mean = {
        m: statistics.fmean(per[m] for per in metrics.values() if m in per) for m in sorted(names)
    }
    return {**metrics, "mean": mean}


def ranking(run_dir: Path, bundle: DataBundle, group: str | None, names: list[str]) -> dict:
    """``ranking_report`` of the best checkpoint in ``run_dir`` on the test split."""
    trained = load_trained(run_dir)
    groups = group_codes(bundle, "test", group) if group else None
    tasks = [t for t in trained.tasks if t.name in names]
    report = ranking_report(trained.model, bundle.test, tasks, groups)
    keep = ("auc", "gauc", "log_loss")
    return {task: {k: v for k, v in entry.items() if k in keep} for task, entry in report.items()}


def step_costs(
    configs: dict[str, RunConfig], bundle: DataBundle, *, rounds: int = 6, steps: int = 10
) -> dict[str, tuple[int, float]]:
    """Label → (parameters, median seconds per training step) of each configured model; the
    ``single-task`` entry is one model per task, its step one step of each. The models take turns
    (``rounds`` × ``steps`` timed steps each, after warm-up) so that a busy machine slows them
    alike."""
    torch.manual_seed(0)
    loader = BatchLoader(bundle.train, next(iter(configs.values())).data.batch_size, seed=0)
    x, y = next(iter(loader))

    def trainer(config: RunConfig, tasks: list[TaskSpec]) -> tuple[int, Callable[[], None]]:
        model = build_model_for(config, tasks, bundle.input_shape)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step() -> None:
            out = model(x).outputs
            loss = sum(t.compute_loss(out[t.name], y[t.name])[0] for t in tasks)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()

        return sum(p.numel() for p in model.parameters()), step

    steppers: dict[str, list[Callable[[], None]]] = {}
    params: dict[str, int] = {}
    for label, config in configs.items():
        groups = [[t] for t in bundle.tasks] if label == "single-task" else [list(bundle.tasks)]
        built = [trainer(config, tasks) for tasks in groups]
        params[label] = sum(n for n, _ in built)
        steppers[label] = [step for _, step in built]
    times: dict[str, list[float]] = {label: [] for label in configs}
    for steps_of in steppers.values():  # warm-up
        for _ in range(3):
            for step in steps_of:
                step()
    for _ in range(rounds):
        for label, steps_of in steppers.items():
            for _ in range(steps):
                start = time.perf_counter()
                for step in steps_of:
                    step()
                times[label].append(time.perf_counter() - start)
    return {label: (params[label], statistics.median(times[label])) for label in configs}


@torch.no_grad()
def cvr_predictions(run_dir: Path, bundle: DataBundle) -> np.ndarray:
    """pCVR on every test impression: ESMM's CVR tower (``extras["cvr"]``) or the probability
    of a model whose one task is ``cvr``."""
    trained = load_trained(run_dir)
    model = trained.model.eval()
    inputs = bundle.test.inputs
    out: list[np.ndarray] = []
    for start in range(0, len(bundle.test), 4096):
        rows = torch.arange(start, min(start + 4096, len(bundle.test)))
        result = model(take_inputs(inputs, rows))
        if result.extras and "cvr" in result.extras:
            out.append(result.extras["cvr"].numpy())
        else:
            out.append(torch.sigmoid(result.outputs["cvr"]).numpy())
    return np.concatenate(out)


def selection_bias(seed: int, args: argparse.Namespace, output: Path, esmm_dir: Path) -> dict:
    """ESMM's pCVR against a CVR model trained on clicked impressions only (the ``cvr`` task of
    ``recsys-synthetic``, missing where nothing was clicked), judged over *every* test
    impression with the generator's conversion draw (``converts_if_clicked``: what the
    impression would have done had it been clicked) and its true pCVR."""
    naive = recipe("recsys-synthetic", "shared-bottom", seed, args, output)
    raw = config_to_dict(naive)
    raw["name"] = "recsys-naive-cvr"
    raw["data"]["params"]["cvr_task"] = True
    raw["data"]["tasks"] = ["cvr"]
    naive = parse_config(raw, source="naive cvr")
    naive_run = train_with_baselines(naive)
    bundle = build_data(naive)
    size = {"num_users": 1000, "num_items": 500, "num_categories": 20}
    log = generate_log(seed=seed, num_impressions=args.impressions, **size)
    test = split_indices(
        args.impressions,
        val_fraction=naive.data.val_fraction,
        test_fraction=naive.data.test_fraction,
        seed=seed,
    )["test"]
    latent = log.converts_if_clicked[test].astype(float)
    clicked = log.click[test] > 0
    true_mean = float(log.p_cvr[test].mean())
    out = {}
    for label, run_dir in (("CVR on clicks (naive)", naive_run.run_dir), ("ESMM pCVR", esmm_dir)):
        p = cvr_predictions(run_dir, bundle)
        out[label] = {
            "all impressions": {
                "cvr_auc": auc(p, latent),
                "mean_pcvr_bias": float(p.mean()) - true_mean,
            },
            "clicked impressions": {"cvr_auc": auc(p[clicked], latent[clicked])},
        }
    return out


def run_dataset(dataset: str, args: argparse.Namespace, output: Path) -> tuple[str, dict[str, Any]]:
    spec = DATASETS[dataset]
    labels = ["single-task", *architectures(dataset)]
    results: dict[str, list[dict[str, dict[str, float]]]] = {label: [] for label in labels}
    started = time.perf_counter()
    cost_configs: dict[str, RunConfig] = {}
    first_bundle: DataBundle | None = None
    bias: dict[str, list[dict[str, dict[str, float]]]] = {}
    for seed in range(args.seeds):
        bundle: DataBundle | None = None
        for label in labels[1:]:
            config = recipe(dataset, label, seed, args, output)
            baselines = label == "shared-bottom"  # single-task models: the same recipe, per task
            result = train_with_baselines(config, baselines=baselines)
            bundle = bundle or build_data(config)
            first_bundle = first_bundle or bundle
            names = [t.name for t in result.tasks]
            results[label].append(with_mean(ranking(result.run_dir, bundle, spec["group"], names)))
            if baselines:
                single: dict[str, dict[str, float]] = {}
                for name in names:
                    folder = result.run_dir / "baselines" / name
                    single.update(ranking(folder, bundle, spec["group"], [name]))
                results["single-task"].append(with_mean(single))
            if label == "ESMM":
                for name, metrics in selection_bias(seed, args, output, result.run_dir).items():
                    bias.setdefault(name, []).append(metrics)
            if seed == 0:
                cost_configs[label] = config
                if baselines:
                    cost_configs["single-task"] = config
            print(
                f"{dataset} seed {seed} {label:13s} mean AUC "
                f"{results[label][-1]['mean']['auc']:.4f}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    assert first_bundle is not None
    cost = step_costs({label: cost_configs[label] for label in labels}, first_bundle)
    summary = summarize_groups({label: results[label] for label in labels})
    table = comparison_markdown(summary, metrics=spec["metrics"])
    cost_lines = ["| architecture | parameters | median step (ms) |", "|---|---|---|"]
    for label in labels:
        params, seconds = cost[label]
        cost_lines.append(f"| {label} | {params:,} | {1000 * seconds:.2f} |")
    size = f"{args.impressions:,} impressions" if dataset == "recsys-synthetic" else "2,417 samples"
    bias_text = ""
    if bias:
        bias_table = comparison_markdown(summarize_groups(bias), digits=4)
        bias_text = (
            "\nSample selection bias (ESMM, Ma et al., SIGIR 2018): pCVR of a model trained on "
            "clicked impressions only vs ESMM's pCVR tower, scored on every test impression "
            "against the generator's conversion draw (what each impression would have done if "
            "clicked) — `cvr_auc` — and `mean_pcvr_bias`, the mean predicted pCVR minus the "
            "mean true pCVR over all test impressions:\n\n" + bias_table + "\n"
        )
    return (
        f"## {dataset}\n\n"
        f"Test split, mean ± std over {args.seeds} seeds ({size}, 70/15/15 split by seed, best "
        f"checkpoint by validation loss); `mean` averages the tasks. "
        f"{(time.perf_counter() - started) / 60:.1f} min.\n\n"
        f"{table}\n\nCost at equal expert width (batch {spec['data']['batch_size']}, one CPU "
        f"thread):\n\n" + "\n".join(cost_lines) + "\n" + bias_text,
        summary,
    )


def plot(summaries: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5 * len(summaries), 3.6), dpi=120)
    axes = [axes] if len(summaries) == 1 else list(axes)
    for ax, (dataset, summary) in zip(axes, summaries.items(), strict=True):
        labels = list(summary)
        means = [summary[x]["mean"]["auc"][0] for x in labels]
        stds = [summary[x]["mean"]["auc"][1] for x in labels]
        ax.bar(labels, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        low = min(m - s for m, s in zip(means, stds, strict=True))
        high = max(m + s for m, s in zip(means, stds, strict=True))
        ax.set_ylim(low - 0.02, high + 0.01)
        ax.set_title(f"{dataset}: test AUC (mean over tasks)")
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs")
    parser.add_argument("--impressions", type=int, default=50_000, help="recsys-synthetic size")
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default: temporary)")
    parser.add_argument(
        "--markdown", type=Path, default=ROOT / "benchmarks/results/architectures_tabular.md"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/architectures_tabular.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections, summaries = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            text, summary = run_dataset(dataset, args, args.runs or Path(tmp))
            sections.append(text)
            summaries[dataset] = summary
            print("\n" + text, flush=True)
    markdown = (
        "# Architectures on tabular multi-task data\n\n"
        "Produced by `benchmarks/architectures_tabular.py`.\n\n" + "\n".join(sections)
    )
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(markdown)
    plot(summaries, args.plot)
    print(f"wrote {args.markdown} and {args.plot}")


if __name__ == "__main__":
    main()
