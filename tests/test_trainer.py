"""Training end to end through the library: determinism, resume equality, missing labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polytask.config import parse_config
from polytask.run import load_trained, resume_run, train_run
from polytask.train.checkpoint import load_checkpoint
from polytask.train.runlog import read_metrics


def _records(path: Path) -> list[dict]:
    """The metrics log without wall-clock measurements (the only fields allowed to differ)."""
    timed = {"time_s", "train_time_s", "data_wait_fraction"}
    return [{k: v for k, v in r.items() if k not in timed} for r in read_metrics(path)]


def _train(raw: dict, run_dir: Path, **kwargs):
    return train_run(parse_config(raw), run_dir=run_dir, **kwargs)


def test_same_config_and_seed_give_identical_metrics(tiny_raw: dict, tmp_path: Path) -> None:
    a = _train(tiny_raw, tmp_path / "a")
    b = _train(tiny_raw, tmp_path / "b")
    assert a.test == b.test
    assert _records(tmp_path / "a" / "metrics.jsonl") == _records(tmp_path / "b" / "metrics.jsonl")


def test_run_folder_contents(tiny_raw: dict, tmp_path: Path) -> None:
    result = _train(tiny_raw, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "run.json", "metrics.jsonl", "curves.png", "results.json"):
        assert (run / name).is_file(), name
    records = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert set(records[0]["train"]) == {"t1", "t2"} and set(records[0]["weights"]) == {"t1", "t2"}
    assert "rmse" in records[0]["val"]["t1"]
    state = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert state["epoch"] == 3 and "log_vars" in state["balancer"]
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "metadata"}
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "results.json").read_text())["test"] == result.test


class _Interrupt(Exception):
    pass


def test_interrupted_then_resumed_run_matches_uninterrupted(tiny_raw: dict, tmp_path: Path):
    tiny_raw["train"]["epochs"] = 4
    tiny_raw["model"]["encoder_params"]["dropout"] = 0.2  # exercises the RNG state too
    full = _train(tiny_raw, tmp_path / "full")

    def stop_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _train(tiny_raw, tmp_path / "cut", callbacks=[stop_after_two])
    resumed = resume_run(tmp_path / "cut", progress=False)
    assert resumed.test == full.test
    assert _records(tmp_path / "cut" / "metrics.jsonl") == _records(
        tmp_path / "full" / "metrics.jsonl"
    )


def test_resume_drops_log_lines_written_after_the_checkpoint(tiny_raw: dict, tmp_path: Path):
    _train(tiny_raw, tmp_path / "run")
    log = tmp_path / "run" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([*lines, lines[-1].replace('"epoch": 3', '"epoch": 4')]) + "\n")
    resume_run(tmp_path / "run", progress=False)  # already finished: nothing more to train
    assert [r["epoch"] for r in read_metrics(log)] == [1, 2, 3]


def test_a_task_missing_from_every_batch_trains_without_nan(tiny_raw: dict, tmp_path: Path):
    tiny_raw["data"]["params"]["missing_fraction"] = 0.97
    tiny_raw["data"]["batch_size"] = 16
    result = _train(tiny_raw, tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert any(r["train"]["t1"]["absent_steps"] > 0 for r in records)
    trained = load_trained(tmp_path / "run")
    for p in trained.model.parameters():
        assert p.isfinite().all()
    assert set(result.test) == {"t1", "t2"}


def test_early_stopping_stops(tiny_raw: dict, tmp_path: Path) -> None:
    tiny_raw["train"]["epochs"] = 30
    tiny_raw["optimizer"]["lr"] = 0.05
    tiny_raw["train"]["early_stopping"] = {"metric": "t1/rmse", "patience": 1, "min_delta": 10.0}
    result = _train(tiny_raw, tmp_path / "run")
    assert result.fit is not None and result.fit.stopped_early
    assert result.fit.epochs_run == 2 and result.fit.best_epoch == 1


def test_bad_early_stopping_metric_names_field(tiny_raw: dict, tmp_path: Path) -> None:
    from polytask.errors import ConfigError

    tiny_raw["train"]["early_stopping"] = {"metric": "t1/accuracy"}
    with pytest.raises(ConfigError, match=r"train.early_stopping.metric: task 't1' has no metric"):
        _train(tiny_raw, tmp_path / "run")


def test_sgd_and_constant_schedule(tiny_raw: dict, tmp_path: Path) -> None:
    tiny_raw["optimizer"] = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
    tiny_raw["schedule"] = {"name": "constant"}
    tiny_raw["balancing"] = {"method": "equal"}
    result = _train(tiny_raw, tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["lr"] == pytest.approx(0.01)
    assert records[0]["weights"] == {"t1": 1.0, "t2": 1.0}
    assert result.test["t1"]["rmse"] > 0


def test_accumulated_micro_batches_equal_one_large_batch(tiny_raw: dict, tmp_path: Path) -> None:
    """Two micro-batches of B (missing labels included) step exactly like one batch of 2B."""
    tiny_raw["model"]["encoder_params"]["dropout"] = 0.0
    tiny_raw["train"]["epochs"] = 2
    tiny_raw["schedule"] = {"name": "constant"}
    tiny_raw["data"]["batch_size"] = 64
    big = _train(tiny_raw, tmp_path / "big")
    tiny_raw["data"]["batch_size"] = 32
    tiny_raw["train"]["accumulate_steps"] = 2
    small = _train(tiny_raw, tmp_path / "small")
    for task, metrics in big.test.items():
        for name, value in metrics.items():
            assert small.test[task][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, name)


def test_bf16_autocast_trains_on_cpu(tiny_raw: dict, tmp_path: Path) -> None:
    tiny_raw["train"]["precision"] = "bf16"
    tiny_raw["balancing"] = {"method": "mgda"}  # a gradient method: Gramian in fp32
    result = _train(tiny_raw, tmp_path / "run")
    assert all(v == v for m in result.test.values() for v in m.values())  # no NaN


def test_fp16_on_cpu_and_unsupported_methods_fail_clearly(tiny_raw: dict, tmp_path: Path) -> None:
    from polytask.errors import ConfigError

    tiny_raw["train"]["precision"] = "fp16"
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        _train(tiny_raw, tmp_path / "a")
    tiny_raw["train"]["precision"] = "fp32"
    tiny_raw["train"]["accumulate_steps"] = 2
    tiny_raw["balancing"] = {"method": "gradnorm"}
    with pytest.raises(ConfigError, match="GradNorm does not support"):
        _train(tiny_raw, tmp_path / "b")


def test_runtime_checks_precision_and_gradient_scaling_before_training() -> None:
    """The runtime refuses what the device or the method cannot do when it is created or set up,
    before any step; a method declares ``supports_grad_scale``, nothing is probed."""
    from polytask.balancing import build_balancer
    from polytask.errors import ConfigError
    from polytask.models import build_model
    from polytask.runtime import Runtime
    from polytask.tasks import TaskSpec

    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        Runtime("cpu", precision="fp16")
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "regression")]
    model = build_model(tasks, (3,), encoder_params={"hidden": [8]})
    gradnorm = build_balancer("gradnorm", tasks)
    assert not gradnorm.supports_grad_scale
    with pytest.raises(ConfigError, match="GradNorm does not support fp16 loss scaling"):
        Runtime("cpu").setup(model, gradnorm, accumulate_steps=2)
    runtime = Runtime("cpu")
    runtime.setup(model, build_balancer("equal", tasks), accumulate_steps=2)
    assert runtime.grad_scale(micro_batches=2) == 0.5
    assert runtime.grad_scale(micro_batches=1) == 1.0 and runtime.state_dict() is None


def test_compile_falls_back_cleanly(tiny_raw: dict, tmp_path: Path, monkeypatch) -> None:
    """Where torch.compile cannot run, training continues eagerly with the same result."""
    import torch

    def broken_compile(module, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no compiler on this machine")

        return run

    eager = _train(tiny_raw, tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", broken_compile)
    tiny_raw["train"]["compile"] = True
    compiled = _train(tiny_raw, tmp_path / "compiled")
    assert compiled.test == eager.test


def test_data_wait_is_reported(tiny_raw: dict, tmp_path: Path) -> None:
    _train(tiny_raw, tmp_path / "run")
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert 0.0 <= record["data_wait_fraction"] < 1.0 and record["train_time_s"] > 0


def test_task_weights_and_class_balance_from_config(tmp_path: Path) -> None:
    from polytask.run.data import build_data

    raw = {
        "name": "digits",
        "data": {
            "dataset": "multi-digits",
            "params": {"num_train": 300, "num_val": 60, "num_test": 60},
            "task_weights": {"sum": 0.25},
            "class_balance": {"both_even": "inverse"},
        },
        "output_dir": str(tmp_path),
    }
    bundle = build_data(parse_config(raw))
    tasks = {t.name: t for t in bundle.tasks}
    assert tasks["sum"].weight == 0.25 and tasks["left"].weight == 1.0
    y = bundle.train.targets["both_even"]
    positives = float((y == 1).float().mean())  # about 1/4 of pairs have two even digits
    negative_w, positive_w = tasks["both_even"].class_weights
    assert positive_w / negative_w == pytest.approx((1 - positives) / positives, rel=1e-4)
    raw["data"]["class_balance"] = {"sum": "inverse"}
    from polytask.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.class_balance.sum: applies to binary"):
        build_data(parse_config(raw))
    raw["data"]["class_balance"] = {}
    raw["data"]["task_weights"] = {"nope": 2.0}
    with pytest.raises(ConfigError, match=r"data.task_weights: unknown task\(s\) nope"):
        build_data(parse_config(raw))


def test_a_stop_swallowed_by_a_finalizer_stops_the_loop_at_its_next_step(
    tiny_raw: dict, tmp_path: Path, monkeypatch
) -> None:
    """A SIGTERM whose KeyboardInterrupt lands inside a finalizer is ignored by Python (CI saw
    one in a matplotlib weakref callback: the run went on); the request is kept and the loop
    raises it at its next step."""
    import signal
    import sys

    from polytask.errors import RunInterrupted
    from polytask.runtime import interrupts

    class DroppedWhileTheSignalArrives:
        def __del__(self) -> None:  # what cli.app's handler does, inside a finalizer
            interrupts.request_stop(signal.SIGTERM)
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "unraisablehook", interrupts._unraisable)
    tiny_raw["train"]["epochs"] = 3
    stepped: list[int] = []

    def after_epoch(record: dict) -> None:
        stepped.append(record["step"])
        if record["epoch"] == 1:
            DroppedWhileTheSignalArrives()  # collected at once: the exception is swallowed

    try:
        with pytest.raises(RunInterrupted, match="polytask train --resume"):
            _train(tiny_raw, tmp_path / "run", callbacks=[after_epoch])
    finally:
        interrupts.clear_stop_request()
    assert len(stepped) == 1  # epoch 2 stopped at its first step
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1]
    assert not interrupts.stop_requested()
