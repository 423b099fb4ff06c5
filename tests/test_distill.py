"""Knowledge distillation: the loss per task kind, the student's configuration, and a student
run trained from a teacher run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from polytask.cli import app
from polytask.errors import ConfigError
from polytask.run.distill import distillation_loss, parameter_count, student_config
from polytask.run.folder import load_trained
from polytask.run.recipes import load_recipe
from polytask.run.single import train_run
from polytask.tasks import TaskSpec

KINDS = [
    TaskSpec("c", "multiclass", num_classes=3),
    TaskSpec("b", "binary"),
    TaskSpec("m", "multilabel", num_classes=2),
    TaskSpec("r", "regression"),
]


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.kind)
def test_distillation_loss_is_zero_only_for_the_teachers_outputs(task: TaskSpec) -> None:
    shape = (8,) if task.output_dim == 1 and task.kind != "multilabel" else (8, task.output_dim)
    teacher = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    same = distillation_loss(task, teacher.clone(), teacher, temperature=2.0)
    other = distillation_loss(task, teacher + torch.randn(shape), teacher, temperature=2.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    assert float(other) > 1e-3


def test_student_config_scales_widths_or_reads_a_model_section(tmp_path: Path) -> None:
    teacher = load_recipe("text-two-task", [])
    half = student_config(teacher, "half")
    assert half.model.encoder_params["d_model"] == 32
    assert half.model.encoder_params["feedforward"] == 64
    assert half.data == teacher.data and half.balancing == teacher.balancing
    path = tmp_path / "student.yaml"
    raw = {
        "name": "s",
        "data": {"dataset": "text-topics"},
        "model": {"encoder": "transformer", "encoder_params": {"d_model": 16, "heads": 2}},
    }
    path.write_text(yaml.safe_dump(raw))
    assert student_config(teacher, str(path)).model.encoder_params["d_model"] == 16
    with pytest.raises(ConfigError, match="neither a size"):
        student_config(teacher, "enormous")
    with pytest.raises(ConfigError, match="size factor"):
        student_config(teacher, "2")


def test_distill_trains_a_smaller_student_run(tmp_path: Path) -> None:
    config = load_recipe(
        "students-csv",
        [
            "train.epochs=1",
            "train.progress=false",
            f"output_dir={tmp_path}",
            "model.encoder_params.hidden=[32,32]",
        ],
    )
    teacher_dir = train_run(config).run_dir
    result = CliRunner().invoke(
        app,
        [
            "distill",
            str(teacher_dir),
            "--student",
            "quarter",
            "--epochs",
            "2",
            "--method",
            "equal",
            "--temperature",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    student = load_trained(tmp_path / "students-student")
    teacher = load_trained(teacher_dir)
    assert student.config.model.encoder_params["hidden"] == [8, 8]
    assert student.config.balancing.method == "equal"
    assert parameter_count(student.model) < parameter_count(teacher.model) / 3
    assert [t.name for t in student.tasks] == [t.name for t in teacher.tasks]
    bad = CliRunner().invoke(app, ["distill", str(teacher_dir), "--student", "nothing"])
    assert bad.exit_code == 1 and "error:" in bad.output
