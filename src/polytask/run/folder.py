"""The run folder: where one run keeps everything, and how a trained model comes back from it.

A run folder holds ``config.yaml`` (the resolved configuration), ``run.json`` (tasks with their
fitted target scales, input shape, feature names, fitted preprocessing), ``metrics.jsonl``,
``curves.png``, ``checkpoints/{best,last}.safetensors``, ``results.json`` and, with baselines,
``baselines/<task>/`` (one single-task run folder per task). Every checkpoint carries the same
metadata as ``run.json``, so ``load_trained`` needs nothing but the checkpoint. That metadata
records each dataset's fingerprint (``data.datasets[i].fingerprint``: a file's size and SHA-256,
or a built-in dataset's name and parameters); ``check_data`` refuses to evaluate or resume a run
on data that changed since.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from polytask import __version__
from polytask.config import RunConfig, config_to_dict, load_config, parse_config
from polytask.data.bundle import DataBundle, apply_preprocessors
from polytask.data.preprocess import Inputs, Preprocessor, preprocessor_from_dict
from polytask.errors import CheckpointError, ConfigError, DataError, RunInterrupted
from polytask.io import strict_json, write_text_atomic
from polytask.models import MultiTaskModel
from polytask.run.build import build_model_for
from polytask.tasks import TaskSpec
from polytask.train.checkpoint import load_checkpoint, read_checkpoint_metadata

#: configuration fields that may be edited in ``config.yaml`` before ``--resume``: they change
#: neither the data, the model's shapes, the method nor any state the checkpoint restores (the
#: optimizer's learning rate, for one, comes back from the checkpoint, so ``optimizer`` may not
#: change); the edited values are applied
RESUMABLE_FIELDS = (
    "name",
    "output_dir",
    "train.epochs",
    "train.progress",
    "train.device",
    "train.early_stopping.patience",
    "train.early_stopping.min_delta",
    "train.nonfinite",
    "train.loggers",  # what watches the run, not what it computes
    "train.mlflow",
    "balancing.diagnostics",
    "schedule.",
    "evaluate.",
    "data.eval_batch_size",
    # how streamed data is read, not what is read (turning streaming on or off is refused)
    "data.streaming.workers",
    "data.streaming.prefetch",
    "data.streaming.cache_dir",
    "data.streaming.chunk_rows",
)


def config_differences(
    before: dict[str, Any], after: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """(dotted field, value before, value after) for every field that differs.

    >>> config_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}})
    [('a.c', 2, 3)]
    """
    found = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += config_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append((f"{prefix}{key}", old, new))
    return found


def run_metadata(config: RunConfig, bundle: DataBundle) -> dict[str, Any]:
    """What a run folder (and each of its checkpoints) says about itself."""
    shape = bundle.input_shape
    return {
        "polytask_version": __version__,
        "config": config_to_dict(config),
        "tasks": [t.to_dict() for t in bundle.tasks],
        "input_shape": shape if isinstance(shape, dict) else list(shape),
        "feature_names": bundle.feature_names,
        "categorical_names": bundle.categorical_names,
        "preprocessors": {k: p.to_dict() for k, p in bundle.preprocessors.items()},
        "data": bundle.info,
    }


@dataclass
class TrainedModel:
    """A trained model with everything needed to preprocess inputs and decode outputs."""

    model: MultiTaskModel
    tasks: list[TaskSpec]
    config: RunConfig
    input_shape: Any
    feature_names: list[str] | None
    categorical_names: list[str] | None
    preprocessors: dict[str, Preprocessor]

    def preprocess(self, raw: Any) -> Inputs:
        """Raw inputs (as the dataset gives them) → model inputs, with the run's fitted
        preprocessing."""
        return apply_preprocessors(raw, self.preprocessors)


_CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_-]+")


class RunFolder:
    """The files of one run, by name (see the module docstring for the layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def fresh(cls, config: RunConfig) -> RunFolder:
        """``output_dir/name``, or ``name-2``, ``name-3``... so no earlier run is overwritten."""
        base = Path(config.output_dir) / config.name
        candidate, n = base, 1
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
        return cls(candidate)

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    def checkpoint(self, name: str = "best") -> Path:
        """``checkpoints/<name>.safetensors`` (``best`` or ``last``): a name inside the run
        folder, never a path leading out of it."""
        if not _CHECKPOINT_NAME.fullmatch(name):
            raise CheckpointError(
                f"checkpoint: a checkpoint name inside the run folder (best, last), found {name!r}"
            )
        return self.path / "checkpoints" / f"{name}.safetensors"

    def baseline(self, task: str) -> RunFolder:
        """The folder of ``task``'s single-task baseline."""
        return RunFolder(self.path / "baselines" / task)

    # ------------------------------------------------------------------ reading
    def read_config(self) -> RunConfig:
        """The resolved configuration saved in the folder."""
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.path}: not a polytask run folder (no config.yaml)")
        return load_config(self.config_path)

    def read_results(self) -> dict[str, Any]:
        """``results.json`` of a finished run; a metric saved as ``null`` (not a number) reads
        back as NaN."""
        if not self.results_path.is_file():
            raise CheckpointError(f"{self.path}: no results.json (did the run finish?)")
        results = dict(json.loads(self.results_path.read_text()))
        for key in ("test", "baselines"):
            if isinstance(results.get(key), dict):
                results[key] = {
                    task: {m: math.nan if v is None else v for m, v in metrics.items()}
                    for task, metrics in results[key].items()
                }
        return results

    def require_checkpoint(self, name: str) -> Path:
        path = self.checkpoint(name)
        if not path.is_file():
            raise CheckpointError(f"{self.path}: no checkpoints/{name}.safetensors")
        return path

    def load_trained(self, checkpoint: str = "best") -> TrainedModel:
        """The model of this run, rebuilt from its checkpoint's own metadata, in eval mode."""
        path = self.require_checkpoint(checkpoint)
        state = load_checkpoint(path)
        meta = state["metadata"]
        config = parse_config(meta["config"], source=str(path))
        tasks = [TaskSpec.from_dict(t) for t in meta["tasks"]]
        model = build_model_for(config, tasks, meta["input_shape"])
        model.load_state_dict(state["model"])
        model.eval()
        shape = meta["input_shape"]
        return TrainedModel(
            model=model,
            tasks=tasks,
            config=config,
            input_shape=shape if isinstance(shape, dict) else tuple(shape),
            feature_names=meta.get("feature_names"),
            categorical_names=meta.get("categorical_names"),
            preprocessors={k: preprocessor_from_dict(d) for k, d in meta["preprocessors"].items()},
        )

    def resume_config(self) -> tuple[RunConfig, list[str]]:
        """The configuration to resume with: ``config.yaml`` as the user may have edited it,
        checked against the configuration stored in the ``last`` checkpoint. A changed field
        outside ``RESUMABLE_FIELDS`` is a ``ConfigError`` naming it; the resumable changes are
        returned as lines to report (``field: old -> new``)."""
        edited = self.read_config()
        stored = read_checkpoint_metadata(self.require_checkpoint("last"))
        saved = stored.get("metadata", {}).get("config")
        if saved is None:
            return edited, []
        changes = config_differences(_with_defaults(saved), config_to_dict(edited))
        refused = [c for c in changes if not c[0].startswith(RESUMABLE_FIELDS)]
        if refused:
            fields = "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in refused)
            raise ConfigError(
                f"{self.config_path}: changed since the checkpoint and not resumable ({fields}); "
                "restore it or start a new run (only epochs, the schedule, early-stopping "
                "patience, evaluation and display settings may change on resume)"
            )
        return edited, [f"{field}: {old!r} -> {new!r}" for field, old, new in changes]

    def check_data(self, bundle: DataBundle, checkpoint: str = "best") -> None:
        """``DataError`` (one line) when the data ``bundle`` was read from is not what the run
        was trained on: a file's size or SHA-256, or a built-in dataset's parameters, differ
        from the fingerprint in checkpoint ``checkpoint``. A run that recorded no fingerprint
        (written by an earlier polytask), or a missing checkpoint, is not checked."""
        path = self.checkpoint(checkpoint)
        if not path.is_file():
            return
        stored = read_checkpoint_metadata(path).get("metadata", {})
        recorded = (stored.get("data") or {}).get("datasets") or []
        now = {d["name"]: d.get("fingerprint") for d in bundle.info.get("datasets", [])}
        for entry in recorded:
            before, after = entry.get("fingerprint"), now.get(entry.get("name"))
            if before is None or after is None:
                continue
            changed = _fingerprint_change(before, after)
            if changed:
                raise DataError(
                    f"{changed} since the run in {self.path} was trained, so its splits and "
                    "metrics would not be the run's; restore it or train a new run"
                )

    def load_weights(self, model: MultiTaskModel, checkpoint: str = "best") -> None:
        """Load a checkpoint's model weights into ``model``."""
        model.load_state_dict(load_checkpoint(self.require_checkpoint(checkpoint))["model"])

    # ------------------------------------------------------------------ a run in progress
    @contextmanager
    def session(self, metadata: dict[str, Any] | None, *, owner: bool = True) -> Iterator[None]:
        """Hold the folder while a run trains in it.

        The ``owner`` (rank 0; other processes only read) creates the folder, writes
        ``metadata`` (``config.yaml``, ``run.json``; ``None`` on resume) and holds
        ``.lock``, so a second process training or resuming the same folder fails with one
        line. Ctrl-C or SIGTERM becomes ``RunInterrupted`` naming the folder. A folder this run
        created is removed again if the run fails before its first checkpoint, so no empty run
        folder is left behind."""
        created = not self.path.exists()
        with self._lock(owner):
            try:
                if owner and metadata is not None:
                    self.write_metadata(metadata)
                yield
            except KeyboardInterrupt:
                raise RunInterrupted.in_folder(self.path) from None
            except BaseException:
                if owner and created and not self.checkpoint("last").exists():
                    shutil.rmtree(self.path, ignore_errors=True)
                raise

    @contextmanager
    def _lock(self, owner: bool) -> Iterator[None]:
        """An exclusive lock on ``.lock`` (POSIX ``flock``; released when the process dies)."""
        if not owner:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks through fcntl; run unlocked
            yield
            return
        with open(self.path / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise CheckpointError(
                    f"{self.path}: in use by {holder}; wait for it to finish or use another folder"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"polytask process {os.getpid()}")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ writing
    def write_metadata(self, metadata: dict[str, Any]) -> None:
        """``config.yaml`` and ``run.json`` of a new run."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config_path, yaml.safe_dump(metadata["config"], sort_keys=False))
        write_text_atomic(self.path / "run.json", json.dumps(metadata, indent=2))

    def write_results(self, results: dict[str, Any]) -> None:
        """``results.json``: strict JSON, a metric that is not a number written as ``null``."""
        write_text_atomic(self.results_path, strict_json(results, indent=2))


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration with the fields added since it was written at their defaults
    (an older run folder's config lacks them); as stored if it no longer parses."""
    try:
        return config_to_dict(parse_config(saved, source="checkpoint"))
    except ConfigError:
        return saved


def _fingerprint_change(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """What differs between two fingerprints of one dataset, or ``None``.

    >>> _fingerprint_change({"file": "a.csv", "size": 9, "sha256": "ab"},
    ...                     {"file": "a.csv", "size": 9, "sha256": "cd"})
    'a.csv: changed (size 9 -> 9 bytes, sha256 ab… -> cd…)'
    """
    if "sha256" in before:
        if (before.get("size"), before["sha256"]) == (after.get("size"), after.get("sha256")):
            return None
        return (
            f"{before.get('file', after.get('file'))}: changed (size {before.get('size')} -> "
            f"{after.get('size')} bytes, sha256 {before['sha256'][:12]}… -> "
            f"{str(after.get('sha256'))[:12]}…)"
        )
    if before == after:
        return None
    return f"dataset {before.get('dataset')!r}: generated differently ({before} -> {after})"


def load_trained(run_dir: str | Path, *, checkpoint: str = "best") -> TrainedModel:
    """The trained model of the run folder ``run_dir`` (``RunFolder(run_dir).load_trained``)."""
    return RunFolder(run_dir).load_trained(checkpoint)


__all__ = ["RunFolder", "TrainedModel", "load_trained", "run_metadata"]
