"""Streaming an image folder through a DataLoader: throughput, data wait and peak memory.

Generates folders of 5,000 and 20,000 random 64×64 grayscale PNG images (with two labels) in a
temporary directory, then trains one epoch of a small CNN (polytask's ``cnn`` encoder, two
heads) with polytask's Trainer on the training split (70 %) of each folder, read

* ``stream``: by ``polytask.data.streaming`` (``StreamingBatches``) with 0 and 2 worker
  processes, normalisation statistics fitted in a streaming pass;
* ``memory``: by the in-memory path (``image-folder`` → ``build_bundle`` → ``BatchLoader``).

Each measurement runs in a fresh Python process, so its peak RSS (``ru_maxrss`` of the process,
plus the largest worker's) is its own. The table gives samples/s of the epoch (reading the
files included for ``memory``: the load before training is counted), the Trainer's share of
step time spent waiting for data, and the peak RSS. Streaming memory should not grow with the
folder; in-memory memory does.

    python benchmarks/loading.py [--sizes 5000 20000] [--workers 0 2] [--batch-size 128]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
TASKS = [
    {"name": "digit", "kind": "multiclass", "num_classes": 10},
    {"name": "bright", "kind": "binary"},
]


def generate(folder: Path, n: int) -> None:
    """``n`` random 64×64 grayscale PNGs and their labels.csv in ``folder``."""
    from PIL import Image
    from rich.progress import track

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    rows = []
    for i in track(range(n), description=f"generating {n} images"):
        pixels = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png", compress_level=1)
        rows.append(f"{i:06d}.png,{i % 10},{int(pixels.mean() > 127.5)}")
    (folder / "labels.csv").write_text("file,digit,bright\n" + "\n".join(rows) + "\n")


def _trainer(tasks, input_shape, batches):  # type: ignore[no-untyped-def]
    import torch

    from polytask.balancing import build_balancer
    from polytask.models import build_model
    from polytask.runtime import Runtime
    from polytask.train.trainer import Trainer

    torch.manual_seed(0)
    model = build_model(
        tasks, input_shape, encoder="cnn", encoder_params={"channels": [4, 8], "out_features": 32}
    )
    return Trainer(
        model,
        build_balancer("equal", tasks),
        tasks,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        scheduler=None,
        train_batches=batches,
        val_batches=None,
        epochs=1,
        runtime=Runtime(torch.device("cpu")),
        progress=False,
    )


def measure(folder: Path, loader: str, workers: int, batch_size: int) -> dict[str, float]:
    """One epoch in this process: samples/s, data-wait share, peak RSS in MiB."""
    import torch

    import polytask.balancing
    import polytask.models
    import polytask.train.trainer  # noqa: F401  (imported before the clock starts)
    from polytask.data.batches import BatchLoader
    from polytask.data.bundle import build_bundle
    from polytask.data.sources import DATASETS
    from polytask.data.streaming import StreamingBatches, stream_image_folder

    torch.set_num_threads(1)
    start = time.perf_counter()
    if loader == "stream":
        tasks, splits = stream_image_folder(
            str(folder), TASKS, size=(64, 64), mode="L", workers=workers
        )
        train = splits["train"]
        batches = StreamingBatches(train, batch_size, shuffle=True, workers=workers)
        shape: tuple[int, ...] = train.sample_shape
        n = len(train)
    else:
        table = DATASETS.get("image-folder")(
            seed=0, path=str(folder), tasks=TASKS, size=[64, 64], mode="L"
        )
        bundle = build_bundle(table, seed=0)
        tasks, shape, n = bundle.tasks, bundle.input_shape, len(bundle.train)
        batches = BatchLoader(bundle.train, batch_size, shuffle=True)  # type: ignore[assignment]
    result = _trainer(tasks, shape, batches).fit()
    elapsed = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "samples_per_s": n / elapsed,
        "wait": float(result.history[0]["data_wait_fraction"]),
        "rss_mib": own / 1024,
        "worker_rss_mib": children / 1024,
    }


def run_isolated(folder: Path, loader: str, workers: int, batch_size: int) -> dict[str, float]:
    """``measure`` in a fresh Python process (its own peak RSS)."""
    command = [sys.executable, __file__, "--measure", str(folder), loader, str(workers)]
    command += ["--batch-size", str(batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row")
    parser.add_argument("--measure", nargs=3, metavar=("FOLDER", "LOADER", "WORKERS"))
    args = parser.parse_args()
    if args.measure:
        folder, loader, workers = args.measure
        print(json.dumps(measure(Path(folder), loader, int(workers), args.batch_size)))
        return
    from polytask.io import write_text_atomic

    runs = [("stream", w) for w in args.workers] + [("memory", 0)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"images{n}"
            generate(folder, n)
            for loader, workers in runs:
                runs_ = [
                    run_isolated(folder, loader, workers, args.batch_size)
                    for _ in range(args.repeats)
                ]
                m = {k: statistics.median(r[k] for r in runs_) for k in runs_[0]}
                rss = sorted(r["rss_mib"] for r in runs_)
                rows.append(
                    f"| {n:,} | {loader} | {workers if loader == 'stream' else '-'} | "
                    f"{m['samples_per_s']:,.0f} | {100 * m['wait']:.1f}% | "
                    f"{m['rss_mib']:,.0f} ({rss[0]:,.0f}–{rss[-1]:,.0f}) | "
                    f"{m['worker_rss_mib']:,.0f} |"
                )
                print(rows[-1], flush=True)
    table = "\n".join(
        [
            "# Streaming an image folder (benchmarks/loading.py)",
            "",
            f"One training epoch (70 % of the folder), batch {args.batch_size}, small CNN "
            "(`cnn` encoder, channels 4, 8; 2 heads), CPU, 1 torch thread, each row the median "
            f"of {args.repeats} fresh processes run back to back. "
            "The machine (2 cores) was shared with other work: throughput is noisy; peak RSS "
            "much less so (its range over the repeats in brackets).",
            "",
            "| images | loader | workers | samples/s | data wait | peak RSS MiB (range) | "
            "largest worker RSS MiB |",
            "|---:|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "*samples/s*: training samples over the whole run, reading included (for `memory`, "
            "loading the folder before the epoch; for `stream`, the normalisation pass). "
            "*data wait*: the Trainer's time waiting for the next batch, share of the epoch.",
            "",
        ]
    )
    print(table)
    write_text_atomic(RESULTS / "loading.md", table)


if __name__ == "__main__":
    main()
