"""Two ``polytask tune`` processes share one study in a PostgreSQL database, as two machines
would (Optuna's own distributed mode).

The database URL comes from ``POLYTASK_TEST_POSTGRES_URL`` (``.ci/run`` installs Debian's
``postgresql``, starts it, creates a throwaway role and database and exports it). Without the
URL the test is skipped locally and FAILS in CI (``CI=true``); with the URL, a server that
cannot be reached fails it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from polytask.errors import ConfigError
from polytask.tune.study import open_storage

URL_VARIABLE = "POLYTASK_TEST_POSTGRES_URL"


def _unavailable(why: str, *, asked: bool) -> None:
    if asked or os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required here: {why}")
    pytest.skip(f"no PostgreSQL: {why}")


@pytest.fixture
def postgres_url() -> str:
    """The database's URL; a server that cannot be reached fails the test when the URL is set
    (or in CI), and skips it otherwise."""
    url = os.environ.get(URL_VARIABLE)
    if not url:
        _unavailable(f"{URL_VARIABLE} is not set", asked=False)
    assert url is not None
    try:
        open_storage(url)  # polytask's own way in: connects, creates Optuna's tables
    except ConfigError as exc:
        _unavailable(str(exc), asked=True)
    return url


def test_two_tune_processes_share_one_postgres_study(tmp_path: Path, postgres_url: str) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "output_dir": str(tmp_path / "runs"),
                "data": {
                    "dataset": "mmoe-synthetic",
                    "params": {"num_samples": 400, "input_dim": 8},
                    "batch_size": 64,
                },
                "model": {"encoder": "mlp", "encoder_params": {"hidden": [8]}},
                "train": {"epochs": 2, "progress": False},
            }
        )
    )
    space = tmp_path / "space.yaml"
    space.write_text("optimizer.lr: {log_uniform: [1.0e-3, 3.0e-2]}\n")
    study_name = f"shared-{uuid.uuid4().hex[:8]}"  # the database outlives the test
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def tune(machine: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable, "-m", "polytask", "tune", str(config), "--space", str(space),
                "--trials", "4", "--objective", "pareto", "--study", study_name,
                "--storage", postgres_url, "--output", str(tmp_path / machine), "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment,
        )  # fmt: skip

    processes = [tune("machine-a"), tune("machine-b")]
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output

    storage = open_storage(postgres_url)
    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 4 <= len(complete) <= 5  # a process may finish the trial it had started
    assert len({t.number for t in complete}) == len(complete)
    folders = {Path(t.user_attrs["run_dir"]).parent.parent.name for t in complete}
    assert folders <= {"machine-a", "machine-b"}
    for machine in ("machine-a", "machine-b"):  # each process reports the whole shared study
        table = (tmp_path / machine / "trials.csv").read_text().splitlines()
        assert len(table) - 1 >= 4
        assert not (tmp_path / machine / "study.db").exists()  # nothing stored locally
    optuna.delete_study(study_name=study_name, storage=storage)
