"""Shared fixtures: a tiny, seconds-long run configuration."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# the balancing tests' shared helpers (tiny_steps.py, guarantees.py), imported by the test modules
# of tests/balancing/ and its subfolders
sys.path.insert(0, str(Path(__file__).parent / "balancing"))

# Tiny tensors: one thread avoids oversubscribing small CI machines (5x faster here).
torch.set_num_threads(1)

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "dataset": "mmoe-synthetic",
        "params": {"num_samples": 600, "input_dim": 16, "missing_fraction": 0.2},
        "batch_size": 64,
    },
    "model": {"encoder": "mlp", "encoder_params": {"hidden": [16, 16]}},
    "balancing": {"method": "uncertainty"},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "schedule": {"name": "cosine", "warmup_epochs": 0.5},
    "train": {"epochs": 3, "progress": False, "grad_clip": 1.0},
}


@pytest.fixture
def tiny_raw(tmp_path: Path) -> dict[str, Any]:
    """A fresh copy of the tiny configuration writing its runs under ``tmp_path``."""
    raw = copy.deepcopy(TINY)
    raw["output_dir"] = str(tmp_path / "runs")
    return raw


@pytest.fixture
def tiny_yaml(tmp_path: Path, tiny_raw: dict[str, Any]) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


# run folders written by an earlier version, and the script that wrote them (not tests)
collect_ignore_glob = ["fixtures/*"]
