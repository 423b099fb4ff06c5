"""TensorBoard and MLflow trackers, read back and compared with ``metrics.jsonl``."""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from polytask.config import parse_config
from polytask.errors import ConfigError
from polytask.run.single import resume_run, train_run
from polytask.train.runlog import RunLog
from polytask.train.trackers import MlflowTracker, TensorBoardTracker


@pytest.fixture(autouse=True)
def _local_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own client


def _leaves(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, Mapping):
        for key, child in value.items():
            yield from _leaves(f"{prefix}/{key}", child)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield prefix, float(value)


def _expected(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, read from metrics.jsonl by hand."""
    out: dict[str, dict[int, float]] = {}
    for record in records:
        step = record["step"]
        for section in ("train", "val", "weights"):
            for tag, value in _leaves(section, record[section]):
                out.setdefault(tag, {})[step] = value
        for key in ("lr", "epoch", "time_s"):
            out.setdefault(key, {})[step] = float(record[key])
        d = record.get("diagnostics")
        if d:
            a, b = d["tasks"][:2]
            for s, cosine, norms in zip(d["steps"], d["cosine"], d["norms"], strict=True):
                out.setdefault(f"diagnostics/cosine/{a}/{b}", {})[s] = cosine[0][1]
                out.setdefault(f"diagnostics/norm/{a}", {})[s] = norms[0]
    return out


def _run(tiny_raw: dict[str, Any], loggers: list[str], epochs: int = 2) -> Path:
    raw = copy.deepcopy(tiny_raw)
    raw["train"].update(epochs=epochs, loggers=loggers)
    raw["balancing"]["diagnostics"] = {"every": 4}
    return Path(train_run(parse_config(raw)).run_dir)


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def _mlflow(run_dir: Path) -> tuple[MlflowClient, str]:
    recorded = json.loads((run_dir / "mlflow_run.json").read_text())
    assert recorded["tracking_uri"] == (run_dir / "mlruns").resolve().as_uri()  # the default
    return MlflowClient(tracking_uri=recorded["tracking_uri"]), recorded["run_id"]


def _check_values(found: dict[int, float], expected: dict[int, float], tag: str) -> None:
    expected = {s: v for s, v in expected.items() if v is not None and math.isfinite(v)}
    assert set(found) == set(expected), tag
    for step, value in expected.items():
        assert found[step] == pytest.approx(value, rel=1e-6, abs=1e-9), (tag, step)


def test_every_scalar_reaches_tensorboard_and_mlflow(tiny_raw: dict[str, Any]) -> None:
    run_dir = _run(tiny_raw, ["tensorboard", "mlflow"])
    expected = _expected(_records(run_dir))
    assert any(tag.startswith("diagnostics/cosine/") for tag in expected)

    events = _tensorboard(run_dir)
    tags = events.Tags()
    assert set(expected) <= set(tags["scalars"])
    for tag, values in expected.items():
        _check_values({e.step: e.value for e in events.Scalars(tag)}, values, tag)
    assert "plots/curves" in tags["images"]
    assert events.PluginTagToContent("hparams")  # the config as hyper-parameters

    client, run_id = _mlflow(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["balancing.method"]
    assert set(expected) <= set(run.data.metrics)
    for tag, values in expected.items():
        history = client.get_metric_history(run_id, tag)
        _check_values({m.step: m.value for m in history}, values, tag)
    artifacts = {
        a.path for folder in ("plots", "checkpoints") for a in client.list_artifacts(run_id, folder)
    }
    assert {
        "plots/curves.png",
        "checkpoints/best.safetensors",
        "checkpoints/last.safetensors",
    } <= artifacts


def test_a_resumed_run_continues_its_trackers(tiny_raw: dict[str, Any]) -> None:
    run_dir = _run(tiny_raw, ["tensorboard", "mlflow"], epochs=1)
    _, first_id = _mlflow(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["train"]["epochs"] = 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    resume_run(run_dir, progress=False)
    expected = _expected(_records(run_dir))
    client, run_id = _mlflow(run_dir)
    assert run_id == first_id  # the same MLflow run, continued
    history = client.get_metric_history(run_id, "train/t1/loss")
    _check_values({m.step: m.value for m in history}, expected["train/t1/loss"], "mlflow")
    scalars = _tensorboard(run_dir).Scalars("train/t1/loss")
    _check_values({e.step: e.value for e in scalars}, expected["train/t1/loss"], "tensorboard")


def test_the_tracking_uri_comes_from_the_config_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_store = (tmp_path / "env-store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_store)
    tracker = MlflowTracker(tmp_path / "a", tracking_uri=None, experiment="e", run_name="a")
    tracker.log_scalars([("lr", 0.5, 3)])
    tracker.close()
    history = MlflowClient(tracking_uri=env_store).get_metric_history(tracker.run_id, "lr")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    config_store = (tmp_path / "config-store").as_uri()
    tracker = MlflowTracker(tmp_path / "b", tracking_uri=config_store, experiment="e", run_name="b")
    assert tracker.tracking_uri == config_store and not (tmp_path / "a" / "mlruns").exists()


def test_only_the_writing_process_opens_trackers(tmp_path: Path) -> None:
    config = {"name": "x", "train": {"loggers": ["tensorboard"]}}
    RunLog(tmp_path / "rank1", writes=False, metadata={"config": config}).start()
    assert not (tmp_path / "rank1").exists()
    log = RunLog(tmp_path / "rank0", metadata={"config": config})
    log.start()
    assert len(log.trackers) == 1 and (tmp_path / "rank0" / "tensorboard").is_dir()
    log.trackers[0].close()


@pytest.mark.parametrize(
    ("module", "name"), [("torch.utils.tensorboard", "tensorboard"), ("mlflow.tracking", "mlflow")]
)
def test_a_missing_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, name: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like
    config = {"name": "x", "train": {"loggers": [name]}}
    with pytest.raises(ConfigError, match=r"train\.loggers: .*pip install 'polytask\[trackers\]'"):
        RunLog(tmp_path, metadata={"config": config}).start()


def test_an_unknown_logger_names_the_field(tiny_raw: dict[str, Any]) -> None:
    tiny_raw["train"]["loggers"] = ["wandb"]
    with pytest.raises(ConfigError, match=r"train\.loggers\.0"):
        parse_config(tiny_raw)
    assert TensorBoardTracker  # imported lazily: importing polytask needs neither package
