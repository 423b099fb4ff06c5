from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from polytask.config import load_config, parse_config
from polytask.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_is_valid() -> None:
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert paths, "no configs found"
    for path in paths:
        load_config(path)


def test_all_errors_are_collected_with_file_and_field(tmp_path: Path, tiny_raw: dict) -> None:
    tiny_raw["model"]["encoder"] = "transformerz"
    tiny_raw["balancing"] = {"method": "uncertainty", "params": {"init": 1}}
    tiny_raw["optimizer"]["lr"] = "fast"
    tiny_raw["train"]["epochz"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "optimizer.lr: Input should be a valid number" in message
    assert "train.epochz: unknown key" in message
    # registry checks run once the types are right: fix the types and look again
    tiny_raw["optimizer"]["lr"] = 0.1
    del tiny_raw["train"]["epochz"]
    path.write_text(yaml.safe_dump(tiny_raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "2 problems" in message
    assert "model.encoder: unknown encoder 'transformerz'; known: " in message
    assert "cnn" in message and "mlp" in message
    assert "balancing.params: unknown parameter 'init'" in message and "init_log_var" in message


def test_unknown_dataset_and_parameter(tiny_raw: dict) -> None:
    tiny_raw["data"]["params"]["samples"] = 3
    with pytest.raises(ConfigError, match=r"data.params: unknown parameter 'samples'.*num_samples"):
        parse_config(tiny_raw, source="x.yaml")
    tiny_raw["data"]["dataset"] = "imagenet"
    with pytest.raises(ConfigError, match=r"data.dataset: unknown dataset 'imagenet'; known: .*"):
        parse_config(tiny_raw, source="x.yaml")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line"):
        load_config(bad)


def test_overrides(tiny_yaml: Path) -> None:
    config = load_config(tiny_yaml, ["train.epochs=7", "data.params.correlation=0.9"])
    assert config.train.epochs == 7
    assert config.data.params["correlation"] == 0.9
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(tiny_yaml, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown key"):
        load_config(tiny_yaml, ["train.epocs=2"])


def test_bytes_seeds_and_tasks_are_checked_up_front(tmp_path: Path, tiny_raw: dict) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_config(latin1)
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        load_config(tmp_path)
    for seed in (-1, 2**32, 1e30):
        with pytest.raises(ConfigError, match="seed: "):
            parse_config({**tiny_raw, "seed": seed})
    assert parse_config({**tiny_raw, "seed": 2**32 - 1}).seed == 2**32 - 1
    tiny_raw["data"]["tasks"] = []
    with pytest.raises(ConfigError, match=r"data\.tasks: empty; leave it out"):
        parse_config(tiny_raw)
    tiny_raw["data"]["tasks"] = ["t2", "t1", "t2"]
    with pytest.raises(ConfigError, match=r"data\.tasks: 't2' listed more than once"):
        parse_config(tiny_raw)
