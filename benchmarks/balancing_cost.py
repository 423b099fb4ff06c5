"""Cost of every balancing method on a reference model, as ratios to equal weighting.

The reference: an MLP trunk 256→1024→1024→256 with ReLU (1,575,168 shared parameters), batch 128,
K linear heads alternating MSE regression and 10-class cross-entropy, synthetic data, plain SGD.
``--family`` swaps the trunk for another model family (``FAMILIES``: the multi-digits CNN, a
ResNet-18-style encoder on 32×32 images, the text transformer on 64 tokens, the tabular encoder
with embeddings, MMoE over MLP experts); the heads and the data stay as above.
``--fallback-methods`` adds rows of gradient methods forced onto the batched Jacobian (the
fallback path), ``--batched-methods`` rows whose layer-wise backward is batched over all K tasks
instead of one task per backward (the CPU default), and ``--dbmtl-steps`` the DB-MTL EMA study
(``dbmtl_ema_study``). The first step of every method runs before the timing, and any warning
that the layer-wise Gramian is off is listed in the header.
A *step* is what a training loop does per batch: forward, the K losses, ``balancer.backward``
and ``optimizer.step()``.

For every registered method (``mgda_ub`` is MGDA at ``level="features"``; ``--update-every``
adds rows such as ``nash_mtl (update_every=10)``) and every K:

- **step time**: the median wall-clock time of ``--steps`` steps after ``--warmup`` steps
  (synchronised on CUDA). The methods are timed in interleaved rounds (one step of each method
  per round, the order rotated every round), so a load change on a shared machine hits them all
  alike; ``× equal`` divides by equal weighting's median from the same run. ``mean`` is given
  too: with ``update_every=N`` only one step in N computes the Jacobian, which the median hides.
- **peak memory**: the most memory the step holds above what was live when it began (the model,
  its optimizer and the balancer's state are live then; activations, gradients, the Jacobian and
  every temporary are counted), measured on one extra step. On CUDA:
  ``torch.cuda.max_memory_allocated() − memory_allocated()`` at the start. On CPU, PyTorch keeps
  no allocator statistics, so the step runs under ``torch.profiler`` with ``profile_memory``:
  every CPU tensor allocation and free is recorded with the allocator's running total, and the
  peak is the highest total minus the total before the first allocation. (Allocations outside
  PyTorch's allocator, such as the NumPy K×K solver arrays, are not counted: they are tiny.)
  The resident-set size is not used: it is a process-wide high-water mark that the allocator
  seldom gives back, so it cannot compare methods run one after another.
- **state**: the bytes of the balancer's ``state_dict`` (e.g. DB-MTL's K×P gradient EMA).

It also times the per-task Jacobian of the shared parameters: ONE batched backward
(``task_jacobian(..., batched=True)``, ``is_grads_batched``) against K backward passes with
``retain_graph`` (``batched=False``), and one plain backward for scale.

Usage:
    .venv/bin/python benchmarks/balancing_cost.py                      # full: K = 2 5 10 40
    .venv/bin/python benchmarks/balancing_cost.py --k 2 10 --steps 7   # reduced
    .venv/bin/python benchmarks/balancing_cost.py --family cnn --k 10 --fallback-methods upgrad
    python benchmarks/balancing_cost.py --device cuda

Writes ``benchmarks/results/balancing_cost_<device>.md`` (``_<device>_<family>.md`` for another
family, or ``--output``) and prints it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from polytask.balancing import BALANCERS, Balancer, LossWeighting, build_balancer  # noqa: E402
from polytask.balancing.engine import (  # noqa: E402
    GradientAggregator,
    GramianWeightingAggregator,
)
from polytask.balancing.jacobian import task_jacobian  # noqa: E402
from polytask.models import build_model  # noqa: E402
from polytask.models.architectures import MultiTaskModel  # noqa: E402
from polytask.tasks import TaskSpec  # noqa: E402

INPUT = 256
HIDDEN = [1024, 1024, 256]
CLASSES = 10
#: gradient methods that need the whole K×P Jacobian (not only its Gramian)
JACOBIAN_ONLY = {"graddrop", "db_mtl"}
MB = 2**20


@dataclass
class Variant:
    """One row: a registered method built with ``params``."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    #: False: force the batched Jacobian (the fallback path every non-MLP model took before)
    autogram: bool = True
    #: tasks per backward of the layer-wise path (None: its default, 1 on the CPU)
    task_chunk: int | None = None


@dataclass
class Runner:
    """A model, its balancer and optimizer, and the step times measured for them."""

    variant: Variant
    model: MultiTaskModel
    balancer: Balancer
    optimizer: torch.optim.Optimizer
    times: list[float] = field(default_factory=list)
    peak: float = float("nan")


# --------------------------------------------------------------------------- setup
def reference_tasks(k: int) -> list[TaskSpec]:
    """K tasks alternating MSE regression and 10-class classification."""
    return [
        TaskSpec(f"t{i}", "regression")
        if i % 2 == 0
        else TaskSpec(f"t{i}", "multiclass", num_classes=CLASSES)
        for i in range(k)
    ]


@dataclass(frozen=True)
class Family:
    """A model family: how to build it for K tasks and make a batch of its inputs."""

    description: str
    input_shape: Any
    encoder: str
    encoder_params: dict[str, Any]
    inputs: Callable[[int, torch.Generator], Any]
    architecture: str = "hard_sharing"
    architecture_params: dict[str, Any] = field(default_factory=dict)


TEXT_LENGTH, VOCAB = 64, 2000
CARDINALITIES = [1000, 200, 50, 20, 12, 7]


def _tokens(n: int, g: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(1, VOCAB, (n, TEXT_LENGTH), generator=g)
    ids[: n // 2, TEXT_LENGTH // 2 :] = 0  # half the rows padded
    return {"text": ids}


def _tabular(n: int, g: torch.Generator) -> dict[str, Tensor]:
    codes = [torch.randint(0, c, (n,), generator=g) for c in CARDINALITIES]
    return {"numeric": torch.randn(n, 16, generator=g), "categorical": torch.stack(codes, 1)}


FAMILIES: dict[str, Family] = {
    "mlp": Family(
        f"MLP {INPUT}→{'→'.join(map(str, HIDDEN))} ReLU (the reference)",
        (INPUT,),
        "mlp",
        {"hidden": HIDDEN},
        lambda n, g: torch.randn(n, INPUT, generator=g),
    ),
    "cnn": Family(
        "the multi-digits CNN: conv-BN-ReLU-pool ×2 (32, 64 channels) + linear 128, 1×16×16",
        (1, 16, 16),
        "cnn",
        {"channels": [32, 64], "out_features": 128},
        lambda n, g: torch.randn(n, 1, 16, 16, generator=g),
    ),
    "resnet": Family(
        "ResNet-18-style: 4 stages × 2 basic blocks (64, 128, 256, 512 channels), 3×32×32",
        (3, 32, 32),
        "resnet",
        {"channels": [64, 128, 256, 512], "blocks_per_stage": 2},
        lambda n, g: torch.randn(n, 3, 32, 32, generator=g),
    ),
    "transformer": Family(
        f"text transformer: 2 layers, d_model 64, 4 heads, feed-forward 128, sequence "
        f"{TEXT_LENGTH}, vocabulary {VOCAB}",
        {"text": {"shape": [TEXT_LENGTH], "vocab_size": VOCAB, "pad_id": 0}},
        "transformer",
        {"dropout": 0.0},
        _tokens,
    ),
    "tabular": Family(
        f"tabular: 16 numeric + {len(CARDINALITIES)} categorical columns (cardinalities "
        f"{', '.join(map(str, CARDINALITIES))}; embeddings) → MLP 128→64",
        {
            "numeric": {"shape": [16]},
            "categorical": {"shape": [len(CARDINALITIES)], "cardinalities": CARDINALITIES},
        },
        "tabular",
        {"hidden": [128, 64]},
        _tabular,
    ),
    "mmoe": Family(
        f"MMoE: 8 MLP experts {INPUT}→256→128 ReLU, one softmax gate per task",
        (INPUT,),
        "mlp",
        {"hidden": [256, 128]},
        lambda n, g: torch.randn(n, INPUT, generator=g),
        architecture="mmoe",
        architecture_params={"num_experts": 8},
    ),
}


def reference_model(
    tasks: Sequence[TaskSpec], device: torch.device, family: str = "mlp"
) -> MultiTaskModel:
    spec = FAMILIES[family]
    torch.manual_seed(0)
    model = build_model(
        list(tasks),
        spec.input_shape,
        encoder=spec.encoder,
        encoder_params=spec.encoder_params,
        architecture=spec.architecture,
        architecture_params=spec.architecture_params,
    )
    return model.to(device)


def _to(x: Any, device: torch.device) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def synthetic_batches(
    tasks: Sequence[TaskSpec],
    batch: int,
    device: torch.device,
    count: int = 4,
    family: str = "mlp",
) -> list[tuple[Any, dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        x = FAMILIES[family].inputs(batch, g)
        y = {
            t.name: torch.randn(batch, generator=g)
            if t.kind == "regression"
            else torch.randint(0, CLASSES, (batch,), generator=g)
            for t in tasks
        }
        out.append((_to(x, device), {n: v.to(device) for n, v in y.items()}))
    return out


def variants(
    methods: Sequence[str],
    update_every: int,
    every_methods: Sequence[str],
    fallback_methods: Sequence[str] = (),
    batched_methods: Sequence[str] = (),
) -> list[Variant]:
    rows = [
        Variant(f"{name} (batched Jacobian)", name, autogram=False) for name in fallback_methods
    ]
    rows += [
        Variant(f"{name} (layer-wise, K tasks batched)", name, task_chunk=1 << 30)
        for name in batched_methods
    ]
    for name in methods:
        label = name
        level = BALANCERS.parameters(name).get("level")
        if level is not None and level.default == "features":
            label = f"{name} (level=features)"
        rows.append(Variant(label, name))
        if name in every_methods and update_every > 1:
            rows.append(
                Variant(
                    f"{name} (update_every={update_every})", name, {"update_every": update_every}
                )
            )
    return rows


def family(method: str) -> str:
    builder = BALANCERS.get(method)
    if issubclass(builder, GramianWeightingAggregator):
        return "Gramian weighting"
    if issubclass(builder, GradientAggregator):
        return "Jacobian" if method in JACOBIAN_ONLY else "Gramian (sequential)"
    if issubclass(builder, LossWeighting):
        return "loss weighting"
    return "loss weighting + last-layer gradients"


def time_target(variant: Variant) -> float | None:
    """The step time a method should stay under at K = 10, as a ratio of equal weighting's: the
    budget that keeps it usable on this 1.6M-parameter trunk (loss weightings near 1×)."""
    builder = BALANCERS.get(variant.method)
    level = variant.params.get("level") or getattr(
        BALANCERS.parameters(variant.method).get("level"), "default", None
    )
    if variant.method == "equal":
        return None
    if variant.method == "famo":
        return 1.2
    if not issubclass(builder, GradientAggregator):
        return 1.05
    if level == "features":
        return 1.5 if variant.method == "graddrop" else 1.3
    if variant.method in JACOBIAN_ONLY:
        return None
    return 5.0


def make_runner(
    variant: Variant, tasks: Sequence[TaskSpec], device: torch.device, family: str = "mlp"
) -> Runner:
    model = reference_model(tasks, device, family)
    balancer = build_balancer(variant.method, tasks, params=variant.params).to(device)
    if isinstance(balancer, GradientAggregator):
        balancer.use_autogram = variant.autogram
    balancer.attach(model)
    hooks = getattr(getattr(balancer, "gramian_source", None), "hooks", None)
    if hooks is not None:
        hooks.task_chunk = variant.task_chunk
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=1e-3)
    return Runner(variant, model, balancer, optimizer)


def train_step(r: Runner, x: Any, y: dict[str, Tensor]) -> None:
    out = r.model(x)
    losses = {t.name: t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in r.model.tasks}
    r.optimizer.zero_grad(set_to_none=True)
    r.balancer.backward(losses, shared_params=r.model.shared_parameters(), features=out.features)
    r.optimizer.step()


# --------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> float:
    """The most bytes ``fn`` holds at once above what was allocated when it began."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0.0
    events.sort()
    base = events[0][2] - events[0][1]
    return float(max(total for _, _, total in events) - base)


def state_bytes(balancer: Balancer) -> int:
    return sum(t.numel() * t.element_size() for t in balancer.state_dict().values())


def measure_k(
    k: int, rows: Sequence[Variant], args: argparse.Namespace, device: torch.device
) -> list[Runner]:
    tasks = reference_tasks(k)
    batches = synthetic_batches(tasks, args.batch, device, family=args.family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runners = [make_runner(v, tasks, device, args.family) for v in rows]
        for r in runners:  # the first step, where the layer-wise path checks itself
            train_step(r, *batches[0])
    fallbacks = sorted({str(w.message) for w in caught if "autogram" in str(w.message)})
    for message in fallbacks:
        print(f"  warning: {message}", file=sys.stderr)
    args.fallback_warnings = [*getattr(args, "fallback_warnings", []), *fallbacks]
    for round_ in range(args.warmup + args.steps):
        x, y = batches[round_ % len(batches)]
        shift = round_ % len(runners)
        for r in runners[shift:] + runners[:shift]:
            seconds = timed(lambda r=r, x=x, y=y: train_step(r, x, y), device)
            if round_ >= args.warmup:
                r.times.append(seconds)
        print(f"  K={k}: round {round_ + 1}/{args.warmup + args.steps}", file=sys.stderr)
    x, y = batches[0]
    for r in runners:
        r.optimizer.zero_grad(set_to_none=True)
        r.peak = peak_bytes(lambda r=r, x=x, y=y: train_step(r, x, y), device)
    return runners


def measure_jacobian(k: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median seconds (and peak bytes) of one plain backward, one batched per-task Jacobian
    and K backward passes with ``retain_graph``, on the reference model."""
    tasks = reference_tasks(k)
    model = reference_model(tasks, device, args.family)
    shared = model.shared_parameters()
    x, y = synthetic_batches(tasks, args.batch, device, count=1, family=args.family)[0]

    def losses() -> Tensor:
        out = model(x).outputs
        return torch.stack([t.compute_loss(out[t.name], y[t.name])[0] for t in tasks])

    def backward(vector: Tensor) -> None:
        torch.autograd.grad(vector.sum(), shared)

    def batched(vector: Tensor) -> None:
        task_jacobian(vector, shared, batched=True)

    def naive(vector: Tensor) -> None:
        task_jacobian(vector, shared, batched=False)

    kinds = {"backward": backward, "batched": batched, "naive": naive}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for rep in range(args.jacobian_warmup + args.jacobian_reps):
        for name, fn in kinds.items():
            vector = losses()  # a fresh graph each time, its forward not timed
            seconds = timed(lambda fn=fn, vector=vector: fn(vector), device)
            if rep >= args.jacobian_warmup:
                times[name].append(seconds)
    result = {f"{name}_s": statistics.median(ts) for name, ts in times.items()}
    for name, fn in kinds.items():
        vector = losses()
        result[f"{name}_peak"] = peak_bytes(lambda fn=fn, vector=vector: fn(vector), device)
    return result


# --------------------------------------------------------------------------- DB-MTL's EMA
def dbmtl_ema_study(args: argparse.Namespace) -> list[str]:
    """Can DB-MTL's K×P gradient EMA live at the representation level? Along one training run
    of the parameter-level method (a small MLP, K = 4), compare its shared update with the one
    a representation-level EMA (each task's gradient w.r.t. the shared features, same β schedule
    and max-norm factors, pulled back through the current step's encoder) gives."""
    from polytask.balancing.jacobian import task_jacobian

    torch.manual_seed(0)
    k, batch, width = 4, 64, 32
    tasks = [
        TaskSpec(f"t{i}", "regression")
        if i % 2 == 0
        else TaskSpec(f"t{i}", "multiclass", num_classes=5)
        for i in range(k)
    ]
    model = build_model(tasks, (width,), encoder_params={"hidden": [64, 64, 32]})
    dbmtl = build_balancer("db_mtl", tasks)
    dbmtl.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.005)
    truth = torch.randn(width, k)
    ema: Tensor | None = None
    cosines, gaps = [], []
    for _ in range(args.dbmtl_steps):
        x = torch.randn(batch, width)
        z = x @ truth
        y = {
            t.name: z[:, i] if t.kind == "regression" else (z[:, i] * 2).long().clamp(-2, 2) + 2
            for i, t in enumerate(tasks)
        }
        out = model(x)
        losses = torch.stack([t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in tasks])
        shared = model.shared_parameters()
        feature_rows = task_jacobian(losses, [out.features], retain_graph=True)[0]
        assert feature_rows is not None
        beta_t = dbmtl.beta / (int(dbmtl.ema_steps) + 1.0) ** dbmtl.beta_sigma
        rows = feature_rows.reshape(k, -1)
        ema = (1 - beta_t) * rows if ema is None else beta_t * ema + (1 - beta_t) * rows
        norms = ema.norm(dim=1)
        factors = norms.max() / norms
        pulled = torch.autograd.grad(
            out.features, shared, (factors @ ema).view_as(out.features), retain_graph=True
        )
        opt.zero_grad(set_to_none=True)
        result = dbmtl.backward(losses, shared_params=shared)
        update = torch.cat([p.grad.reshape(-1) for p in shared])
        other = torch.cat([g.reshape(-1) for g in pulled])
        cosines.append(float(torch.nn.functional.cosine_similarity(update, other, dim=0)))
        gaps.append(float(((result.weights - factors).abs() / result.weights).max()))
        opt.step()
    p = sum(t.numel() for t in model.shared_parameters())
    return [
        "## DB-MTL: the gradient EMA at the representation level?",
        "",
        f"A {width}→64→64→32 MLP ({p:,} shared parameters), K = {k}, batch {batch}, "
        f"{args.dbmtl_steps} SGD steps of parameter-level DB-MTL; at each step the update a "
        "representation-level EMA would give (EMA of each task's feature gradient, same β "
        "schedule and max-norm factors, pulled back through the step's encoder).",
        "",
        "| quantity | median | worst |",
        "| --- | ---: | ---: |",
        f"| cosine of the two shared updates | {statistics.median(cosines):.3f} | "
        f"{min(cosines):.3f} |",
        f"| largest relative gap between the task factors | {statistics.median(gaps):.3f} | "
        f"{max(gaps):.3f} |",
        "",
        f"State: K×P = {k * p:,} floats at the parameter level, K×B×d = "
        f"{k * batch * 32:,} at the representation level.",
        "",
    ]


# --------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def k_table(k: int, runners: Sequence[Runner]) -> list[str]:
    equal = next(r for r in runners if r.variant.method == "equal" and not r.variant.params)
    t_equal = statistics.median(equal.times)
    m_equal = equal.peak
    lines = [
        f"### K = {k}",
        "",
        f"equal weighting: median step {t_equal * 1e3:.1f} ms, peak {m_equal / MB:.1f} MiB above "
        "the live model.",
        "",
        "| method | family | median ms | × equal | mean ms | peak MiB | × equal | state MiB "
        "| time target (K=10) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runners:
        med = statistics.median(r.times)
        mean = statistics.fmean(r.times)
        ratio = med / t_equal
        target = time_target(r.variant)
        verdict = "—" if target is None else f"≤ {target:g}× {'✓' if ratio <= target else '✗'}"
        mem_ratio = r.peak / m_equal if m_equal > 0 else float("nan")
        lines.append(
            f"| {r.variant.label} | {family(r.variant.method)} | {med * 1e3:.1f} | "
            f"{fmt_ratio(ratio)} | {mean * 1e3:.1f} | {r.peak / MB:.1f} | {fmt_ratio(mem_ratio)} | "
            f"{state_bytes(r.balancer) / MB:.2f} | {verdict} |"
        )
    lines.append("")
    return lines


def jacobian_table(results: dict[int, dict[str, float]]) -> list[str]:
    lines = [
        "### Per-task Jacobian: one batched backward vs K backward passes",
        "",
        "Median over the repetitions; the forward pass is not timed. *naive* is K calls of "
        "`torch.autograd.grad` with `retain_graph` (`task_jacobian(..., batched=False)`); "
        "*batched* is one `is_grads_batched` call (`batched=True`, what the gradient methods use).",
        "",
        "| K | one backward ms | batched ms | naive ms | naive / batched | batched / backward "
        "| batched peak MiB | naive peak MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, r in results.items():
        lines.append(
            f"| {k} | {r['backward_s'] * 1e3:.1f} | {r['batched_s'] * 1e3:.1f} | "
            f"{r['naive_s'] * 1e3:.1f} | {fmt_ratio(r['naive_s'] / r['batched_s'])} | "
            f"{fmt_ratio(r['batched_s'] / r['backward_s'])} | {r['batched_peak'] / MB:.1f} | "
            f"{r['naive_peak'] / MB:.1f} |"
        )
    lines.append("")
    return lines


def command_line() -> str:
    """How this run was started, without ``--output`` (where it was written is no setting)."""
    argv, shown = sys.argv[1:], []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output":
            skip = True
        elif not arg.startswith("--output="):
            shown.append(arg)
    return " ".join(["python", "benchmarks/balancing_cost.py", *shown])


def load_average() -> str:
    """The machine's 1-minute load average (how busy it was: timings on a shared machine)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


def header(
    args: argparse.Namespace, device: torch.device, seconds: float, loads: Sequence[str]
) -> list[str]:
    shared = sum(
        p.numel()
        for p in reference_model(
            reference_tasks(2), torch.device("cpu"), args.family
        ).shared_parameters()
    )
    threads = torch.get_num_threads()
    memory_source = "CUDA allocator" if device.type == "cuda" else "torch.profiler CPU allocations"
    return [
        f"# Balancing cost on the {args.family} family ({device.type})",
        "",
        f"- device: {device_name(device)}; torch {torch.__version__}; "
        f"{threads} CPU thread{'s' if threads != 1 else ''}; Python {platform.python_version()}",
        f"- model: {FAMILIES[args.family].description} ({shared:,} shared parameters), "
        f"batch {args.batch}, K linear heads alternating MSE and {CLASSES}-class cross-entropy, "
        "SGD",
        "- fallback warnings (the layer-wise Gramian off for a model): "
        + ("; ".join(getattr(args, "fallback_warnings", [])) or "none"),
        f"- {args.steps} timed steps after {args.warmup} warm-up steps per method, interleaved; "
        f"peak memory from one extra step ({memory_source})",
        f"- command: `{command_line()}`; {dt.date.today().isoformat()}; {seconds / 60:.1f} min; "
        f"load average {' → '.join(loads)} on {os.cpu_count()} CPUs (at the start and after "
        "each K: other work on the machine slows every method alike, but adds noise)",
        "",
        "Ratios are to equal weighting measured in the same run. *median ms* is the typical "
        "step; *mean ms* includes the recompute steps of `update_every` rows. *peak MiB*: the "
        "most memory a step holds above what was live when it began. *state MiB*: the "
        "balancer's `state_dict`. *time target*: the issue's target for K = 10 (✓/✗ at this K).",
        "",
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mlp", help="the model")
    parser.add_argument(
        "--fallback-methods",
        nargs="*",
        default=[],
        help="gradient methods to time again on the batched Jacobian (the fallback path)",
    )
    parser.add_argument(
        "--batched-methods",
        nargs="*",
        default=[],
        help="Gramian methods to time again with the layer-wise backward batched over all K",
    )
    parser.add_argument("--k", type=int, nargs="+", default=[2, 5, 10, 40])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered one")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument(
        "--update-every-methods",
        nargs="*",
        default=["nash_mtl"],
        help="Gramian weightings to time again with update_every (a row each)",
    )
    parser.add_argument("--jacobian-k", type=int, nargs="*", default=[10, 40])
    parser.add_argument("--jacobian-reps", type=int, default=10)
    parser.add_argument("--jacobian-warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--dbmtl-steps",
        type=int,
        default=0,
        help="also run the DB-MTL EMA study over this many steps (0: skip)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    methods = args.methods or BALANCERS.names()
    unknown = [m for m in methods if m not in BALANCERS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(BALANCERS.names())}")
    if "equal" not in methods:
        methods = ["equal", *methods]
    args.methods = ["equal", *[m for m in methods if m != "equal"]]
    for m in args.fallback_methods:
        if m not in BALANCERS or not issubclass(BALANCERS.get(m), GradientAggregator):
            parser.error(f"--fallback-methods: {m!r} is not a registered gradient method")
    for m in args.update_every_methods:
        if m not in BALANCERS or not issubclass(BALANCERS.get(m), GramianWeightingAggregator):
            parser.error(f"--update-every-methods: {m!r} is not a registered Gramian weighting")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    start = time.perf_counter()
    loads = [load_average()]
    rows = variants(
        args.methods,
        args.update_every,
        args.update_every_methods,
        args.fallback_methods,
        args.batched_methods,
    )
    body: list[str] = ["## Step cost per method", ""]
    for k in args.k:
        body += k_table(k, measure_k(k, rows, args, device))
        loads.append(load_average())
        print("\n".join(body[-len(rows) - 8 :]), file=sys.stderr)
    if args.jacobian_k:
        results = {k: measure_jacobian(k, args, device) for k in args.jacobian_k}
        body += jacobian_table(results)
    if args.dbmtl_steps:
        body += dbmtl_ema_study(args)
    text = "\n".join(header(args, device, time.perf_counter() - start, loads) + body)
    suffix = "" if args.family == "mlp" else f"_{args.family}"
    name = f"balancing_cost_{device.type}{suffix}.md"
    output = args.output or ROOT / "benchmarks" / "results" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    print(f"\nwritten to {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
