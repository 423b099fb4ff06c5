"""Run folders written by an earlier polytask (commit 5eec728, before the restructure into
``run/``, ``runtime/`` and the balancing engine) still load and resume to the same metrics.

``tests/fixtures/runs-5eec728/<run>/`` was interrupted after epoch 2 of 3 by that code
(``make_fixture.py`` beside it); ``expected_after_resume.json`` holds what resuming it with that
same code gave. Resuming with today's code must give the same test metrics.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "runs-5eec728"


@pytest.mark.parametrize("name", ["tiny-uncertainty", "tiny-mgda"])
def test_an_old_run_folder_resumes_to_the_same_metrics(tmp_path: Path, name: str) -> None:
    from polytask.run import resume_run

    run = tmp_path / name
    shutil.copytree(FIXTURES / name, run)
    expected = json.loads((run / "expected_after_resume.json").read_text())
    result = resume_run(run, progress=False)
    assert result.fit is not None
    assert result.fit.epochs_run == expected["epochs_run"] == 3
    assert result.fit.best_epoch == expected["best_epoch"]
    for task, metrics in expected["test"].items():
        for metric, value in metrics.items():
            assert math.isclose(result.test[task][metric], value, rel_tol=1e-6, abs_tol=1e-7), (
                task,
                metric,
                result.test[task][metric],
                value,
            )
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("name", ["tiny-uncertainty", "tiny-mgda"])
def test_an_old_run_folder_loads_for_inference(name: str) -> None:
    from polytask.run import load_trained

    trained = load_trained(FIXTURES / name)
    assert [t.name for t in trained.tasks] == ["t1", "t2"]
