"""Private multi-task training (DP-SGD): utility, membership inference and cost against ε.

For the private tabular recipe (``private-tabular``: the students table, 4 tasks, 400 records)
and yeast (2,417 genes, 14 binary tasks), each balancing method (by default ``upgrad``, a
gradient aggregation, and ``uncertainty``, a loss weighting with learned weights) is trained at
ε ∈ {1, 3, 8} (δ = 1e-5, clipping norm C = 1, σ chosen by Opacus' RDP accountant to spend ε
over the configured epochs) and without privacy (ε = ∞, the ordinary shuffled batches), and
reports:

* every task's test metric (the task's first metric: rmse for regression, accuracy otherwise);
* the AUC of a loss-threshold membership-inference attack (Yeom et al., CSF 2018): the score of
  a record is minus its loss (the mean over its labelled tasks); members are training records,
  non-members the held-out validation and test records (as many training records, drawn at
  random); 0.5 = the attacker cannot tell them apart;
* the ε actually spent;
* the cost of a private step relative to a non-private one (same model, same method, same
  expected batch): median over repeats of the time of ``steps`` steps, the two trainers taking
  turns, so that other load on the machine slows them alike.

    .venv/bin/python benchmarks/privacy.py                       # both datasets, both methods
    .venv/bin/python benchmarks/privacy.py --datasets private-tabular --epsilons 3 inf

Writes ``benchmarks/results/privacy.md`` and ``docs/privacy.png``. ``--memorise`` instead trains
the tabular recipe made to memorise (two 256-unit layers, 100 epochs, no early stopping) at each
ε and attacks its last checkpoint: ``benchmarks/results/privacy_memorise.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from polytask.config import PrivacyConfig, RunConfig  # noqa: E402
from polytask.data.batches import BatchLoader, MultiLabelDataset  # noqa: E402
from polytask.data.poisson import PoissonBatches  # noqa: E402
from polytask.evaluate.ranking import auc  # noqa: E402
from polytask.io import write_text_atomic  # noqa: E402
from polytask.privacy import PrivateTrainer  # noqa: E402
from polytask.privacy.mechanism import per_record_losses  # noqa: E402
from polytask.run import load_trained  # noqa: E402
from polytask.run.build import build_balancer_for, build_model_for, seed_everything  # noqa: E402
from polytask.run.data import build_data  # noqa: E402
from polytask.run.recipes import load_recipe  # noqa: E402
from polytask.run.single import train_run  # noqa: E402
from polytask.runtime import Runtime  # noqa: E402
from polytask.train.trainer import Trainer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "privacy.md"
PLOT = ROOT / "docs" / "privacy.png"
DATASETS = {"private-tabular": "private-tabular", "yeast": "yeast"}


def config_for(dataset: str, method: str, epsilon: float, output: Path) -> RunConfig:
    """The dataset's recipe with ``method``, private at ``epsilon`` (``inf``: not private)."""
    config = load_recipe(DATASETS[dataset], ["train.progress=false", f"output_dir={output}"])
    privacy = None if math.isinf(epsilon) else PrivacyConfig(target_epsilon=epsilon)
    train = config.train.model_copy(update={"privacy": privacy})
    balancing = config.balancing.model_copy(update={"method": method})
    return config.model_copy(update={"train": train, "balancing": balancing})


def membership_auc(
    run_dir: Path, config: RunConfig, seed: int = 0, checkpoint: str = "best"
) -> float:
    """AUC of the loss-threshold attack: training records (members) vs the held-out validation
    and test records (as many members, drawn at random)."""
    trained = load_trained(run_dir, checkpoint=checkpoint)
    bundle = build_data(config)
    held_out = [
        bundle.val.take(torch.arange(len(bundle.val))),
        bundle.test.take(torch.arange(len(bundle.test))),
    ]
    size = len(bundle.val) + len(bundle.test)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(bundle.train), generator=g)[:size]
    scores, labels = [], []
    batches = [(bundle.train.take(pick), 1.0), *((batch, 0.0) for batch in held_out)]
    for (x, y), label in batches:
        losses, labelled = per_record_losses(trained.model, trained.tasks, x, y)
        mean = losses.sum(1) / labelled.sum(1).clamp_min(1)
        keep = labelled.any(1)
        scores.append(-mean[keep])
        labels.append(torch.full((int(keep.sum()),), label))
    return auc(torch.cat(scores), torch.cat(labels))


def train_one(dataset: str, method: str, epsilon: float, output: Path) -> dict[str, Any]:
    config = config_for(dataset, method, epsilon, output)
    result = train_run(config, run_dir=output / f"{dataset}-{method}-{epsilon}")
    metrics = {t.name: result.test[t.name][t.metric_names[0]] for t in result.tasks}
    names = {t.name: t.metric_names[0] for t in result.tasks}
    spent = result.privacy["epsilon"] if result.privacy else math.inf
    return {
        "metrics": metrics,
        "metric_names": names,
        "mia_auc": membership_auc(result.run_dir, config),
        "epsilon_spent": spent,
    }


def memorisation(dataset: str, method: str, epsilons: list[float], output: Path) -> str:
    """A model made to memorise (two 256-unit layers, 100 epochs, no early stopping) attacked
    at its last checkpoint: the leak that DP-SGD bounds, made visible."""
    lines = [
        f"### {dataset}, made to memorise ({method}, last checkpoint)",
        "",
        "| ε | " + " | ".join(_fmt_eps(e) for e in epsilons) + " |",
        "|---" * (len(epsilons) + 1) + "|",
    ]
    aucs, spent = [], []
    for epsilon in epsilons:
        config = config_for(dataset, method, epsilon, output)
        model = config.model.model_copy(update={"encoder_params": {"hidden": [256, 256]}})
        stopping = config.train.early_stopping.model_copy(update={"patience": None})
        train = config.train.model_copy(update={"epochs": 100, "early_stopping": stopping})
        config = config.model_copy(update={"model": model, "train": train})
        result = train_run(config, run_dir=output / f"memorise-{dataset}-{method}-{epsilon}")
        aucs.append(membership_auc(result.run_dir, config, checkpoint="last"))
        spent.append(result.privacy["epsilon"] if result.privacy else math.inf)
        print(f"memorise {dataset} ε={_fmt(epsilon)}: MIA AUC {aucs[-1]:.3f}", flush=True)
    lines.append("| **MIA AUC** | " + " | ".join(_fmt(a) for a in aucs) + " |")
    lines.append("| ε spent | " + " | ".join(_fmt(e) for e in spent) + " |")
    return "\n".join(lines) + "\n"


def _trainer(config: RunConfig, private: bool) -> tuple[Trainer, Any]:
    """A trainer of ``config``'s model and method on its training split (no run folder)."""
    seed_everything(config.seed)
    bundle = build_data(config)
    model = build_model_for(config, bundle.tasks, bundle.input_shape)
    balancer = build_balancer_for(config, bundle.tasks)
    optimizer = torch.optim.AdamW([*model.parameters(), *balancer.parameters()], lr=1e-3)
    common: dict[str, Any] = {
        "optimizer": optimizer,
        "scheduler": None,
        "val_batches": None,
        "epochs": 1,
        "runtime": Runtime("cpu"),
        "progress": False,
    }
    data: MultiLabelDataset = bundle.train
    if private:
        assert config.train.privacy is not None
        batches: Any = PoissonBatches(data, config.data.batch_size, seed=config.seed)
        trainer: Trainer = PrivateTrainer(
            model,
            balancer,
            bundle.tasks,
            method=config.balancing.method,
            privacy=config.train.privacy.model_copy(update={"target_epsilon": 1e6}),
            train_batches=batches,
            **common,
        )
    else:
        batches = BatchLoader(data, config.data.batch_size, shuffle=True, seed=config.seed)
        trainer = Trainer(model, balancer, bundle.tasks, train_batches=batches, **common)
    return trainer, batches


def step_cost(dataset: str, method: str, *, steps: int, repeats: int, output: Path) -> float:
    """Median over ``repeats`` of (time of ``steps`` private steps) / (time of ``steps``
    non-private steps), taking turns."""
    config = config_for(dataset, method, 3.0, output)
    plain, plain_batches = _trainer(config, private=False)
    private, private_batches = _trainer(config, private=True)

    def run(trainer: Trainer, batches: Any) -> float:
        drawn = [b for _, b in zip(range(steps), _cycle(batches), strict=False)]
        trainer.train_step([drawn[0]])  # warm-up
        started = time.perf_counter()
        for batch in drawn:
            trainer.train_step([batch])
        return time.perf_counter() - started

    ratios = []
    for _ in range(repeats):
        base = run(plain, plain_batches)
        ratios.append(run(private, private_batches) / base)
    return statistics.median(ratios)


def _cycle(batches: Any) -> Any:
    epoch = 0
    while True:
        epoch += 1
        batches.set_epoch(epoch)
        yield from batches


def _fmt_eps(epsilon: float) -> str:
    return "∞" if math.isinf(epsilon) else f"{epsilon:g}"


def _fmt(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.3f}"


def table(
    dataset: str,
    rows: dict[tuple[str, float], dict[str, Any]],
    costs: dict[str, float],
    methods: list[str],
    epsilons: list[float],
) -> str:
    """One markdown table per dataset: tasks' metrics, MIA AUC, ε spent, cost per step."""
    columns = [(m, e) for m in methods for e in epsilons]
    head = "| | " + " | ".join(f"{m} ε={_fmt_eps(e)}" for m, e in columns) + " |"
    lines = [f"### {dataset}", "", head, "|---" * (len(columns) + 1) + "|"]
    first = rows[columns[0]]
    for task, metric in first["metric_names"].items():
        cells = [_fmt(rows[c]["metrics"][task]) for c in columns]
        lines.append(f"| {task} ({metric}) | " + " | ".join(cells) + " |")
    lines.append("| **MIA AUC** | " + " | ".join(_fmt(rows[c]["mia_auc"]) for c in columns) + " |")
    lines.append(
        "| ε spent | " + " | ".join(_fmt(rows[c]["epsilon_spent"]) for c in columns) + " |"
    )
    cost_cells = [f"{costs[m]:.1f}×" if not math.isinf(e) else "1×" for m, e in columns]
    lines.append("| cost per step | " + " | ".join(cost_cells) + " |")
    return "\n".join(lines) + "\n"


def plot(
    results: dict[str, dict[tuple[str, float], dict[str, Any]]],
    methods: list[str],
    epsilons: list[float],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [e for e in epsilons if not math.isinf(e)]
    shown = [*finite, max(finite) * 3]  # ∞ drawn one step to the right
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (dataset, rows) in zip(axes[0], results.items(), strict=True):
        for method in methods:
            values = [rows[(method, e)]["mia_auc"] for e in epsilons]
            ax.plot(shown, values, marker="o", label=f"{method}")
        ax.axhline(0.5, color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_xticks(shown, [*(f"{e:g}" for e in finite), "∞"])
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_ylabel("membership-inference AUC")
        ax.set_title(dataset)
        ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=["upgrad", "uncertainty"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--steps", type=int, default=10, help="steps per timing block")
    parser.add_argument("--repeats", type=int, default=5, help="timing blocks per trainer")
    parser.add_argument(
        "--memorise",
        action="store_true",
        help="only the memorisation check (private-tabular, upgrad), into privacy_memorise.md",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memorise:
        with tempfile.TemporaryDirectory() as tmp:
            text = memorisation("private-tabular", "upgrad", args.epsilons, Path(tmp))
        print(text)
        write_text_atomic(RESULTS.with_name("privacy_memorise.md"), MEMORISE_HEADER + "\n" + text)
        return
    results: dict[str, dict[tuple[str, float], dict[str, Any]]] = {}
    sections = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp)
        for dataset in args.datasets:
            rows = {}
            for method in args.methods:
                for epsilon in args.epsilons:
                    rows[(method, epsilon)] = train_one(dataset, method, epsilon, output)
                    row = rows[(method, epsilon)]
                    print(
                        f"{dataset} {method} ε={_fmt(epsilon)}: MIA AUC {row['mia_auc']:.3f}, "
                        f"{row['metrics']}",
                        flush=True,
                    )
            costs = {
                m: step_cost(dataset, m, steps=args.steps, repeats=args.repeats, output=output)
                for m in args.methods
            }
            results[dataset] = rows
            sections.append(table(dataset, rows, costs, args.methods, args.epsilons))
    minutes = (time.perf_counter() - started) / 60
    text = (
        HEADER.format(minutes=minutes, threads=torch.get_num_threads()) + "\n" + "\n".join(sections)
    )
    print(text)
    write_text_atomic(RESULTS, text)
    plot(results, args.methods, args.epsilons)


HEADER = """# Private multi-task training: utility, membership inference and cost against ε

Written by `benchmarks/privacy.py` ({minutes:.0f} min, CPU, {threads} thread; the machine was
shared with other jobs, so the cost ratios are medians of interleaved timings and still noisy).
δ = 1e-5, C = 1, σ from Opacus' RDP accountant for each recipe's epochs; ε = ∞ is ordinary
(non-private) training with shuffled batches. Test metric per task (rmse: lower is better;
accuracy: higher), the AUC of a loss-threshold membership-inference attack (training records vs
held-out validation and test records, 0.5 = chance), the ε actually spent, and the time of a
private step relative to a non-private one with the same method and batch.
"""

MEMORISE_HEADER = """# Private training against a model made to memorise

Written by `benchmarks/privacy.py --memorise` (CPU, shared machine). The private tabular recipe
with two 256-unit layers, 100 epochs and no early stopping, UPGrad, attacked at its *last*
checkpoint by the loss-threshold membership-inference attack (training records vs held-out
validation and test records; 0.5 = chance). σ is planned for the 100 epochs at each ε.
"""


if __name__ == "__main__":
    main()
