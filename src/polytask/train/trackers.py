"""Trackers: a run's ``metrics.jsonl`` also in TensorBoard and MLflow (``train.loggers``).

``RunLog`` feeds them, on rank 0 only: at the start, the resolved configuration as
hyper-parameters; at every epoch, every number of the epoch's record (see :func:`scalars`) at
the record's optimizer step; at the end, the run folder's plots (and, for MLflow, its
checkpoints and ``metrics.jsonl``) as artifacts.

- ``tensorboard``: a ``SummaryWriter`` on ``RUN_DIR/tensorboard`` (the config as text and as
  the HParams plugin's hyper-parameters; plots as images). A resumed run purges the events
  after the step it resumes from, as ``metrics.jsonl`` drops their lines.
- ``mlflow``: a run in the tracking store ``train.mlflow.tracking_uri``, else
  ``$MLFLOW_TRACKING_URI``, else a local file store in ``RUN_DIR/mlruns``; the experiment is
  ``train.mlflow.experiment`` or the run's name. The MLflow run's id is kept in
  ``RUN_DIR/mlflow_run.json``, so a resumed run continues the same MLflow run.

Both packages are optional (``pip install 'polytask[trackers]'``) and imported only when asked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from polytask.errors import CheckpointError, ConfigError, unknown_name
from polytask.io import strict_json, write_text_atomic

__all__ = [
    "MLFLOW_RUN_FILE",
    "MlflowTracker",
    "TensorBoardTracker",
    "Tracker",
    "flat_config",
    "open_trackers",
    "scalars",
]

EXTRA = "pip install 'polytask[trackers]'"
LOGGERS = ("mlflow", "tensorboard")
"""The trackers ``train.loggers`` may name."""
MLFLOW_RUN_FILE = "mlflow_run.json"
"""Where a run folder keeps the id of its MLflow run (to continue it on resume)."""

Scalar = tuple[str, float, int]


class Tracker(Protocol):
    """What ``RunLog`` sends to an experiment tracker."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_scalars(self, values: Sequence[Scalar]) -> None: ...
    def log_artifacts(self, run_dir: Path) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- what is logged


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (null, nan, a boolean, text...)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _diagnostic_scalars(diagnostics: Mapping[str, Any]) -> Iterator[Scalar]:
    """The gradient diagnostics as series: ``diagnostics/cosine/<a>/<b>`` (each pair once),
    ``diagnostics/norm/<a>`` and ``diagnostics/update_inner/<a>`` at each observed step."""
    tasks = [str(t) for t in diagnostics.get("tasks", [])]
    series = zip(
        diagnostics.get("steps", []),
        diagnostics.get("cosine", []),
        diagnostics.get("norms", []),
        diagnostics.get("update_inner", []),
        strict=False,
    )
    for step, cosine, norms, inner in series:
        for i, a in enumerate(tasks):
            for j in range(i + 1, len(tasks)):
                yield f"diagnostics/cosine/{a}/{tasks[j]}", cosine[i][j], step
            yield f"diagnostics/norm/{a}", norms[i], step
            yield f"diagnostics/update_inner/{a}", inner[i], step


def scalars(record: Mapping[str, Any]) -> list[Scalar]:
    """Every finite number of an epoch record as ``(tag, value, step)``: nested keys joined by
    ``/`` (``train/left/loss``, ``val/left/accuracy``, ``weights/left``, ``lr``...) at the
    record's ``step``; the gradient diagnostics at the steps they observed. ``null``, booleans
    and text are left out.

    Example:
        >>> scalars({"epoch": 1, "step": 7, "train": {"a": {"loss": 0.5, "absent_steps": 0}}})
        [('epoch', 1.0, 7), ('train/a/loss', 0.5, 7), ('train/a/absent_steps', 0.0, 7)]
    """
    step = int(record.get("step", 0))
    out: list[Scalar] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, child in value.items():
                walk(f"{prefix}/{key}" if prefix else str(key), child)
        elif (number := _number(value)) is not None:
            out.append((prefix, number, step))

    for key, value in record.items():
        if key == "step":
            continue
        if key == "diagnostics" and isinstance(value, Mapping):
            out += [
                (t, v, int(s)) for t, v, s in _diagnostic_scalars(value) if _number(v) is not None
            ]
        else:
            walk(str(key), value)
    return [(tag, float(value), s) for tag, value, s in out]


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | float | int | bool]:
    """The configuration as dotted keys (``train.epochs``); lists and ``None`` as text."""
    out: dict[str, str | float | int | bool] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, name))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, ensure_ascii=False, default=str)
    return out


def _plots(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*.png"))


def _missing(package: str) -> ConfigError:
    return ConfigError(f"train.loggers: {package} needs the '{package}' package: {EXTRA}")


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Writes TensorBoard event files in ``log_dir``; ``purge_step`` drops the events at and
    after that step (a resumed run)."""

    def __init__(self, log_dir: Path, *, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The config as text (``config``) and as the HParams plugin's hyper-parameters."""
        from torch.utils.tensorboard.summary import hparams

        text = json.dumps(config, indent=2, ensure_ascii=False, default=str)
        self.writer.add_text("config", "```json\n" + text + "\n```")
        events: Any = self.writer._get_file_writer()  # this run's events, not a sub-folder's
        for summary in hparams(flat_config(config), {}):
            events.add_summary(summary)
        self.writer.flush()

    def log_scalars(self, values: Sequence[Scalar]) -> None:
        for tag, value, step in values:
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_artifacts(self, run_dir: Path) -> None:
        """The run folder's plots as images (``plots/<name>``); checkpoints have no place in
        an event file."""
        from matplotlib.image import imread

        for path in _plots(run_dir):
            image = imread(path)[..., :3]  # RGB(A) floats in [0, 1]
            self.writer.add_image(f"plots/{path.stem}", image, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- MLflow


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses the file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a local store
    inside the run folder is what a run without a tracking server wants, so it is allowed while
    the client opens it (a database URI is untouched)."""
    if not uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def _mlflow_key(tag: str) -> str:
    """``tag`` with the characters MLflow refuses in a key replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", tag)


class MlflowTracker:
    """Logs to an MLflow run through ``MlflowClient`` (no global ``mlflow.start_run`` state).

    A fresh run folder creates the run and records its id in ``RUN_DIR/mlflow_run.json``; a
    resumed one (``resume``) continues the run recorded there.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        tracking_uri: str | None,
        experiment: str,
        run_name: str,
        resume: bool = False,
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow") from None
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        default = (self.run_dir / "mlruns").resolve().as_uri()
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
        with _file_store_allowed(uri):
            self.client = MlflowClient(tracking_uri=uri)
        self.tracking_uri = uri
        recorded = self._recorded_run() if resume else None
        self.run_id = recorded or self._create_run(experiment, run_name)
        if recorded is not None:
            self.client.update_run(self.run_id, status="RUNNING")
        write_text_atomic(
            self.run_dir / MLFLOW_RUN_FILE,
            strict_json({"tracking_uri": uri, "run_id": self.run_id}, indent=2) + "\n",
        )

    def _recorded_run(self) -> str | None:
        path = self.run_dir / MLFLOW_RUN_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: unreadable ({exc}); delete it to start a new MLflow run"
            ) from None
        same_store = isinstance(data, dict) and data.get("tracking_uri") == self.tracking_uri
        return str(data["run_id"]) if same_store and data.get("run_id") else None

    def _create_run(self, experiment: str, run_name: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id if found is not None else self.client.create_experiment(experiment)
        )
        return str(self.client.create_run(experiment_id, run_name=run_name).info.run_id)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The config as parameters (dotted keys), and whole as ``config.json``."""
        from mlflow.entities import Param

        params = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in flat_config(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_dict(self.run_id, dict(config), "config.json")

    def log_scalars(self, values: Sequence[Scalar]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(tag), value, now, step) for tag, value, step in values]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_artifacts(self, run_dir: Path) -> None:
        """The plots (``plots/``), checkpoints (``checkpoints/``) and ``metrics.jsonl``."""
        for path in _plots(run_dir):
            self.client.log_artifact(self.run_id, str(path), artifact_path="plots")
        for path in sorted((run_dir / "checkpoints").glob("*.safetensors")):
            self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")
        if (run_dir / "metrics.jsonl").is_file():
            self.client.log_artifact(self.run_id, str(run_dir / "metrics.jsonl"))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


# --------------------------------------------------------------------------- from the config


def open_trackers(
    config: Mapping[str, Any], run_dir: Path, *, resume_step: int | None = None
) -> list[Tracker]:
    """The trackers ``config["train"]["loggers"]`` names (a resolved config as a dict), for
    ``run_dir``; ``resume_step``: the run resumes after this optimizer step. A fresh run logs
    the config as hyper-parameters."""
    train = config.get("train", {}) if isinstance(config.get("train"), Mapping) else {}
    names = list(train.get("loggers") or [])
    settings = train.get("mlflow") or {}
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            purge = None if resume_step is None else resume_step + 1
            trackers.append(TensorBoardTracker(run_dir / "tensorboard", purge_step=purge))
        elif name == "mlflow":
            run_name = str(config.get("name") or run_dir.name)
            trackers.append(
                MlflowTracker(
                    run_dir,
                    tracking_uri=settings.get("tracking_uri"),
                    experiment=settings.get("experiment") or run_name,
                    run_name=run_dir.name,
                    resume=resume_step is not None,
                )
            )
        else:
            raise ConfigError(f"train.loggers: {unknown_name('logger', name, LOGGERS)}")
    if resume_step is None:
        for tracker in trackers:
            tracker.log_config(config)
    return trackers
