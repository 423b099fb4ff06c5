"""The schema of a run's YAML file, validated at the boundary.

``load_config(path, overrides)`` reads the YAML, applies ``key.sub=value`` overrides, validates
types with pydantic and every registry name and parameter (dataset, encoder, head, architecture,
balancing method), and raises one ``ConfigError`` listing *every* problem, each naming the file
and the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from polytask.balancing import BALANCERS
from polytask.data.mixing import parse_epoch
from polytask.data.samplers import SAMPLERS
from polytask.data.sources import DATASETS
from polytask.errors import ConfigError, unknown_name
from polytask.models import ARCHITECTURES, ENCODERS, HEADS
from polytask.registry import Registry


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetEntry(_Strict):
    """One dataset of ``data.datasets``: which one, its parameters, the tasks it feeds."""

    dataset: str = Field(description="a registered dataset name (`polytask datasets`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the dataset's parameters")
    tasks: list[str] | None = Field(None, description="the tasks it feeds (default: all)")
    weight: float | None = Field(None, ge=0, description="its share under the `fixed` sampler")


class SamplerConfig(_Strict):
    """How often each dataset of ``data.datasets`` is drawn (``polytask.data.mixing``)."""

    name: str = Field("proportional", description="a registered sampler name")
    params: dict[str, Any] = Field(default_factory=dict, description="the sampler's parameters")


class StreamingConfig(_Strict):
    """Read the data batch by batch while training instead of loading it (docs/streaming.md)."""

    workers: int = Field(
        2, ge=0, description="DataLoader worker processes reading batches (0: the training process)"
    )
    prefetch: int = Field(2, ge=1, description="batches each worker reads ahead")
    cache_dir: str | None = Field(
        None,
        description="where a streamed CSV/Parquet file's memory-mapped feature copy is written "
        "(default: the system's temporary folder); removed when the run ends",
    )
    chunk_rows: int = Field(
        50_000, ge=1, description="rows of a CSV/Parquet file read at a time into that copy"
    )


class DataConfig(_Strict):
    """Which dataset, how it is split and batched."""

    dataset: str | None = Field(
        None, description="a registered dataset name (`polytask datasets`); or `datasets`"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the dataset's parameters")
    tasks: list[str] | None = Field(None, description="train only these tasks (default: all)")
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    standardize: bool = True
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(1024, gt=0)
    task_weights: dict[str, float] = Field(
        default_factory=dict, description="a fixed loss weight per task name (default 1)"
    )
    class_balance: dict[str, Literal["inverse", "effective"]] = Field(
        default_factory=dict,
        description="class-balanced loss for skewed binary/multiclass tasks: inverse frequency "
        "or effective number of samples (Cui et al., CVPR 2019), fitted on the training split",
    )
    on_device: bool = Field(
        True, description="keep the in-memory splits on the training device (no copy per batch)"
    )
    # several datasets, one model: used only with `datasets`
    datasets: list[DatasetEntry] | None = Field(
        None, description="one dataset per task or group of tasks, instead of `dataset`"
    )
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    batch_mode: Literal["single", "mixed"] = Field(
        "mixed", description="each batch from one dataset, or each sample drawn on its own"
    )
    epoch: str = Field("sum", description="'steps:N', 'largest', 'smallest' or 'sum'")
    streaming: StreamingConfig | None = Field(
        None,
        description="stream image/audio/dense folders and CSV/Parquet files through worker "
        "processes, for data bigger than memory (null: load the dataset in memory)",
    )


class TransferConfig(_Strict):
    """Transfer learning from a pretrained backbone (``polytask.models.transfer``)."""

    freeze: str = Field(
        "none",
        pattern=r"^(all|none|until:\S+)$",
        description="all (linear probe), none, or until:<module> (train that module and after)",
    )
    unfreeze_at_epoch: int | None = Field(
        None, ge=2, description="linear probe, then fine-tune everything from this epoch on"
    )
    backbone_lr_ratio: float = Field(
        1.0, gt=0, description="the backbone's learning rate as a fraction of optimizer.lr"
    )

    @model_validator(mode="after")
    def _unfreeze_needs_freeze(self) -> TransferConfig:
        if self.unfreeze_at_epoch is not None and self.freeze == "none":
            raise ValueError("unfreeze_at_epoch needs freeze: all or until:<module>")
        return self


class ModelConfig(_Strict):
    """Encoder, heads and how tasks share them."""

    encoder: str = "mlp"
    encoder_params: dict[str, Any] = Field(default_factory=dict)
    head: str = "linear"
    head_params: dict[str, Any] = Field(default_factory=dict)
    architecture: str = "hard_sharing"
    architecture_params: dict[str, Any] = Field(default_factory=dict)
    transfer: TransferConfig = Field(default_factory=TransferConfig)


class DiagnosticsConfig(_Strict):
    """Gradient-conflict diagnostics logged in metrics.jsonl (docs/diagnostics.md)."""

    every: int = Field(
        gt=0, description="every N optimizer steps: task-gradient cosines, norms, ⟨g_k, update⟩"
    )


class BalancingConfig(_Strict):
    """How task losses become one update."""

    method: str = "equal"
    params: dict[str, Any] = Field(default_factory=dict)
    log_losses: bool = Field(
        False, description="balance log(L + eps) instead of L (DB-MTL's loss-scale balancing)"
    )
    diagnostics: DiagnosticsConfig | None = Field(
        None, description="gradient-conflict diagnostics, e.g. {every: 50} (off by default)"
    )


class OptimizerConfig(_Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(_Strict):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length, in epochs")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")


class EarlyStoppingConfig(_Strict):
    metric: str = Field(
        "loss", description="'loss' (mean validation loss) or '<task>/<metric>', e.g. left/accuracy"
    )
    patience: int | None = Field(None, gt=0, description="epochs without improvement; None = off")
    min_delta: float = Field(0.0, ge=0)


class PrivacyConfig(_Strict):
    """Differentially private training (DP-SGD); see docs/privacy.md."""

    target_epsilon: float = Field(
        gt=0, allow_inf_nan=False, description="the run stops before spending more than this ε"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="the δ of (ε, δ)-differential privacy")
    max_grad_norm: float = Field(
        1.0, gt=0, description="C: each record's gradient (or K×P Jacobian) is clipped to this norm"
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="σ (noise std σ·C); None: the σ that spends target_epsilon"
    )
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus' privacy accountant")


class MlflowConfig(_Strict):
    """Where the `mlflow` logger writes (docs/diagnostics.md)."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else RUN_DIR/mlruns)"
    )
    experiment: str | None = Field(None, description="MLflow experiment (default: the run's name)")


class TrainConfig(_Strict):
    epochs: int = Field(10, gt=0)
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    deterministic: bool = True
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    progress: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast precision: bf16 (CPU, CUDA) or fp16 with loss scaling (CUDA)"
    )
    accumulate_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    compile: bool = Field(False, description="torch.compile the model (falls back if unsupported)")
    cuda_graph: bool = Field(
        False,
        description="capture each training step in a CUDA graph and replay it (one process, "
        "AdamW, a loss weighting such as equal; docs/scaling.md)",
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN or infinite task loss or gradient ends the run (stop) or its optimizer "
        "step is skipped and counted (skip)",
    )
    privacy: PrivacyConfig | None = Field(
        None, description="differentially private training (DP-SGD with Poisson sampling)"
    )
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="also send metrics.jsonl's scalars to these trackers (pip install "
        "'polytask[trackers]')",
    )
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


class EvaluateConfig(_Strict):
    baselines: bool = Field(False, description="train single-task baselines and report Δm%")
    group_by: str | None = Field(
        None,
        description="a categorical input column (e.g. user_id): binary tasks also report GAUC, "
        "the impression-weighted mean AUC per group",
    )


class RunConfig(_Strict):
    """A whole run: everything `polytask train` needs."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, lt=2**32, description="0 <= seed < 2**32")
    output_dir: str = "runs"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    balancing: BalancingConfig = Field(default_factory=BalancingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


def _location(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _registry_problems(config: RunConfig) -> list[str]:
    data, model, balancing = config.data, config.model, config.balancing
    checks: list[tuple[str, str, Registry[Any], str, Mapping[str, Any]]] = [
        ("model.encoder", "model.encoder_params", ENCODERS, model.encoder, model.encoder_params),
        ("model.head", "model.head_params", HEADS, model.head, model.head_params),
        (
            "model.architecture",
            "model.architecture_params",
            ARCHITECTURES,
            model.architecture,
            model.architecture_params,
        ),
        ("balancing.method", "balancing.params", BALANCERS, balancing.method, balancing.params),
    ]
    if data.dataset is not None:  # else data.datasets: see _datasets_problems
        checks.insert(0, ("data.dataset", "data.params", DATASETS, data.dataset, data.params))
    return [problem for check in checks for problem in _named(*check)]


def _named(
    field: str, params_field: str, registry: Registry[Any], name: str, params: Mapping[str, Any]
) -> list[str]:
    """Problems with a registered name and its parameters, each naming its field."""
    if name not in registry:
        return [f"{field}: {unknown_name(registry.kind, name, registry.names())}"]
    return [f"{params_field}: {p}" for p in registry.check_params(name, params)]


def _datasets_problems(config: RunConfig) -> list[str]:
    """Problems with ``data.dataset`` / ``data.datasets`` and the sampler."""
    data = config.data
    if data.datasets is None:
        if data.dataset is None:
            return ["data.dataset: required (or data.datasets, one dataset per task)"]
        return []
    problems = []
    if data.dataset is not None:
        problems.append("data: give data.dataset or data.datasets, not both")
    if data.params:
        problems.append(
            "data.params: only with data.dataset; give each entry of data.datasets its own params"
        )
    if not data.datasets:
        problems.append("data.datasets: needs at least one dataset")
    fixed = data.sampler.name == "fixed"
    for i, entry in enumerate(data.datasets):
        field = f"data.datasets.{i}"
        problems += _named(
            f"{field}.dataset", f"{field}.params", DATASETS, entry.dataset, entry.params
        )
        if entry.tasks is not None and not entry.tasks:
            problems.append(f"{field}.tasks: empty; leave it out to use every task")
        if entry.tasks is not None and len(set(entry.tasks)) != len(entry.tasks):
            problems.append(f"{field}.tasks: a task is listed twice")
        if fixed and entry.weight is None:
            problems.append(
                f"{field}.weight: the fixed sampler needs a weight for {entry.dataset!r}"
            )
        if not fixed and entry.weight is not None:
            problems.append(
                f"{field}.weight: only used by the fixed sampler "
                f"(data.sampler.name is {data.sampler.name!r})"
            )
    weights = [e.weight for e in data.datasets]
    if fixed and weights and None not in weights and sum(w or 0.0 for w in weights) <= 0:
        problems.append("data.datasets: the fixed sampler's weights sum to 0")
    problems += _named(
        "data.sampler.name", "data.sampler.params", SAMPLERS, data.sampler.name, data.sampler.params
    )
    try:
        parse_epoch(data.epoch)
    except ConfigError as exc:
        problems.append(f"data.epoch: {exc}")
    return problems


def _tasks_problems(config: RunConfig) -> list[str]:
    """Problems with ``data.tasks``, the tasks to train (which ones exist is known only once
    the data is read)."""
    tasks = config.data.tasks
    if tasks is None:
        return []
    if not tasks:
        return ["data.tasks: empty; leave it out to train every task"]
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        return [f"data.tasks: {', '.join(map(repr, twice))} listed more than once"]
    return []


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (values parsed as YAML) in a nested dict, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def parse_config(raw: Any, *, source: str = "config") -> RunConfig:
    """Validate a parsed YAML mapping; one ``ConfigError`` lists every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections, found {type(raw).__name__}"
        )
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{_location(err['loc'])}: {msg}")
        raise ConfigError(_format(source, lines)) from None
    problems = _registry_problems(config) + _datasets_problems(config) + _tasks_problems(config)
    if problems:
        raise ConfigError(_format(source, problems))
    return config


def _format(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def read_yaml_file(path: str | Path, *, what: str = "config file") -> Any:
    """The parsed YAML of the file at ``path``; a missing, unreadable, non-UTF-8 or malformed
    file is a ``ConfigError`` naming it (a syntax error with its line and column)."""
    path = Path(path)
    if not path.is_file():
        problem = f"a folder, not a {what}" if path.is_dir() else f"no such {what}"
        raise ConfigError(f"{path}: {problem}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(
            f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"
        ) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate the YAML run configuration at ``path``."""
    path = Path(path)
    raw = read_yaml_file(path) or {}
    if isinstance(raw, dict):
        apply_overrides(raw, overrides)
    return parse_config(raw, source=str(path))


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The resolved configuration, JSON/YAML-ready (every default filled in)."""
    return config.model_dump(mode="json")
