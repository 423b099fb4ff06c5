"""ONNX export: every shipped recipe family, trained one tiny epoch, exported, and run by the
torch-free runtime must give ``predict_arrays``' predictions (1e-5, fp32) at batch 1 and 1000,
unknown categories and missing modalities included."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from polytask.cli import app
from polytask.errors import ExportError
from polytask.run.data import dataset_entries, dataset_tables
from polytask.run.folder import TrainedModel, load_trained
from polytask.run.recipes import load_recipe
from polytask.run.single import train_run
from polytask.serve.export import export_onnx, request_columns, table_rows, trace_to_onnx
from polytask.serve.onnx_runtime import OnnxPredictor, file_sha256
from polytask.serve.onnx_tokenizer import SubwordTokenizer
from polytask.serve.predict import predict_arrays

IMAGES = ["data.params.num_train=200", "data.params.num_val=60", "data.params.num_test=60"]
#: recipe → overrides that shrink it to a second of training; the recipes cover every modality
#: (CSV, tabular with categoricals, text, audio, images, multimodal) and every architecture
FAMILIES: dict[str, list[str]] = {
    "students-csv": ["model.encoder_params.hidden=[8]"],
    "recsys-mmoe": ["data.params.num_impressions=1500", "model.architecture_params.num_experts=2"],
    "text-two-task": ["data.params.num_samples=300", "model.encoder_params.layers=1"],
    "audio-two-task": ["data.params.num_samples=120"],
    "multi-digits": IMAGES,
    "multimodal": [*IMAGES, "data.params.missing_modality=0.3"],
    "arch-mmoe": ["data.params.num_samples=400"],
    "arch-ple": ["data.params.num_samples=400"],
    "arch-cgc": ["data.params.num_samples=400"],
    "arch-cross-stitch": IMAGES,
    "arch-mtan": IMAGES,
    "arch-esmm": ["data.params.num_impressions=1500"],
}
#: exported with the dynamo exporter, the default (the others with TorchScript, 3-5x faster to
#: export here; it cannot export the complex STFT of log-mel, nor MTAN's dynamic pooling)
DYNAMO = {"audio-two-task", "multimodal", "arch-mtan"}
TOLERANCE = 1e-5

_cache: dict[str, tuple[TrainedModel, OnnxPredictor, Any]] = {}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export-runs")


def exported(family: str, runs_dir: Path) -> tuple[TrainedModel, OnnxPredictor, Any]:
    """The family's run (trained once per module), its export and its raw table."""
    if family not in _cache:
        overrides = ["train.epochs=1", "train.progress=false", f"output_dir={runs_dir}"]
        config = load_recipe(family, [*overrides, *FAMILIES[family]])
        run = train_run(config)
        exporter = "dynamo" if family in DYNAMO else "torchscript"
        result = export_onnx(run.run_dir, exporter=exporter)
        assert result.exporter == exporter
        tables, _ = dataset_tables(dataset_entries(config), seed=config.seed)
        table = tables[0][1]
        _cache[family] = (load_trained(run.run_dir), OnnxPredictor(result.model_path), table)
    return _cache[family]


def raw_rows(table: Any, index: np.ndarray) -> Any:
    return table_rows(table.inputs, index)


def with_unknown_categories(raw: Any) -> Any:
    """Categorical values never seen in training (and missing ones) in some rows."""
    if not isinstance(raw, dict) or "categorical" not in raw:
        return raw
    block = np.array(raw["categorical"], dtype=object)
    block[::3, 0] = "never-seen-value"
    block[1::5, -1] = None
    block[2::7, 1] = float("nan")
    return {**raw, "categorical": block}


def assert_same(expected: dict[str, np.ndarray], found: dict[str, np.ndarray]) -> None:
    assert list(found) == list(expected)
    for column, want in expected.items():
        got = found[column]
        assert got.shape == want.shape, column
        if want.dtype.kind in "iu":
            np.testing.assert_array_equal(got, want, err_msg=column)
        else:
            np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE, err_msg=column)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_runtime_matches_predict_at_batch_1_and_1000(family: str, runs_dir: Path) -> None:
    trained, predictor, table = exported(family, runs_dir)
    rows = np.random.default_rng(0).integers(0, len(table), size=1000)
    for index in (rows[:1], rows):
        raw = with_unknown_categories(raw_rows(table, index))
        expected = predict_arrays(trained.model, trained.tasks, trained.preprocess(raw))
        assert_same(expected, predictor.predict(request_columns(trained, raw)))


def test_missing_modalities_may_be_left_out_or_none(runs_dir: Path) -> None:
    """A row without its audio (``None``, or the columns left out) predicts as the model does
    for zeros flagged missing."""
    trained, predictor, table = exported("multimodal", runs_dir)
    raw = raw_rows(table, np.arange(40))
    assert not raw["audio_present"].all()  # the data has missing modalities
    lost = {**raw, "audio": np.zeros_like(raw["audio"]), "audio_present": np.zeros(40, bool)}
    expected = predict_arrays(trained.model, trained.tasks, trained.preprocess(lost))
    columns = request_columns(trained, raw)
    as_none = {**columns, "audio": [None] * 40}
    del as_none["audio_present"]
    assert_same(expected, predictor.predict(as_none))
    left_out = {k: v for k, v in columns.items() if not k.startswith("audio")}
    assert_same(expected, predictor.predict(left_out))
    schema = {c.name: c for c in predictor.input_schema}
    assert schema["audio"].optional and schema["audio_present"].optional
    assert not schema["image"].optional or "image_present" in schema


def test_schema_tasks_and_probabilities(runs_dir: Path) -> None:
    trained, predictor, table = exported("students-csv", runs_dir)
    schema = predictor.input_schema
    assert [c.name for c in schema] == trained.feature_names
    assert {c.dtype for c in schema} == {"float64"}
    kinds = {t.name: (t.kind, t.classes) for t in predictor.tasks}
    assert kinds["grade"] == ("multiclass", [0, 1, 2, 3])
    assert kinds["passed"] == ("binary", [0, 1])
    assert kinds["exam_score"] == ("regression", None)
    raw = raw_rows(table, np.arange(5))
    probabilities = predictor.probabilities(request_columns(trained, raw))
    assert set(probabilities) == {"passed", "grade", "stressed"}
    assert probabilities["grade"].shape == (5, 4)
    np.testing.assert_allclose(probabilities["grade"].sum(axis=1), 1.0, rtol=1e-6)
    assert predictor.metadata["sha256"] == file_sha256(predictor.model_path)
    spec = json.loads(predictor.preprocess_path.read_text())
    assert spec["format"] == "polytask-onnx-preprocess/1"


def test_recsys_schema_marks_categorical_columns(runs_dir: Path) -> None:
    trained, predictor, _ = exported("recsys-mmoe", runs_dir)
    categorical = [c.name for c in predictor.input_schema if c.categorical]
    assert categorical == trained.categorical_names


def test_bad_request_is_one_line_naming_the_column(runs_dir: Path) -> None:
    from polytask.errors import DataError

    trained, predictor, table = exported("students-csv", runs_dir)
    columns = request_columns(trained, raw_rows(table, np.arange(3)))
    missing = {k: v for k, v in columns.items() if k != "absences"}
    with pytest.raises(DataError, match="missing input column 'absences'"):
        predictor.predict(missing)
    wrong = {**columns, "absences": ["3", "many", "2"]}
    with pytest.raises(DataError, match="column 'absences', row 1"):
        predictor.predict(wrong)


class _Eigenvalues(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = x[:, :4].reshape(-1, 2, 2)
        return torch.linalg.eigvals(square).real.reshape(x.shape[0], -1)


def test_a_module_that_cannot_be_exported_is_named_in_one_line(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), _Eigenvalues())
    with pytest.raises(ExportError) as caught:
        trace_to_onnx(
            model, (torch.randn(2, 4),), ["x"], ["y"], tmp_path / "m.onnx", exporter="dynamo"
        )
    message = str(caught.value)
    assert "\n" not in message
    assert "module '1' (_Eigenvalues)" in message


def test_torchscript_cannot_export_the_spectrogram_and_says_which_module(
    runs_dir: Path, tmp_path: Path
) -> None:
    """The TorchScript exporter has no complex STFT: the error names the log-mel module (the
    default exporter, dynamo, exports it: see the parity test)."""
    _, predictor, _ = exported("audio-two-task", runs_dir)
    with pytest.raises(ExportError) as caught:
        export_onnx(predictor.metadata["run_dir"], tmp_path / "a.onnx", exporter="torchscript")
    assert "\n" not in str(caught.value)
    assert "module 'model.encoder.melspec' (LogMel)" in str(caught.value)


def test_cli_export_with_int8_and_fp16(runs_dir: Path, tmp_path: Path) -> None:
    trained, predictor, table = exported("students-csv", runs_dir)
    run_dir = Path(predictor.metadata["run_dir"])
    columns = request_columns(trained, raw_rows(table, np.arange(200)))
    reference = predictor.predict(columns)
    for kind in ("int8", "fp16"):
        target = tmp_path / kind / "m.onnx"
        result = CliRunner().invoke(
            app,
            [
                "export",
                str(run_dir),
                "--format",
                "onnx",
                "--output",
                str(target),
                "--quantize",
                kind,
                "--exporter",
                "torchscript",
            ],
        )
        assert result.exit_code == 0, result.output
        compressed = OnnxPredictor(target)
        assert compressed.metadata["quantize"] == kind
        found = compressed.predict(columns)
        np.testing.assert_allclose(found["exam_score"], reference["exam_score"], rtol=0.05)
        assert (found["grade"] == reference["grade"]).mean() > 0.9
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere")])
    assert bad.exit_code == 1
    assert "error:" in bad.output and "nowhere" in bad.output


def test_runtime_imports_and_predicts_without_torch(runs_dir: Path, tmp_path: Path) -> None:
    trained, predictor, table = exported("recsys-mmoe", runs_dir)
    raw = with_unknown_categories(raw_rows(table, np.arange(20)))
    columns = {k: np.asarray(v).tolist() for k, v in request_columns(trained, raw).items()}
    (tmp_path / "columns.json").write_text(json.dumps(columns))
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None  # any import of torch now fails
        from polytask.serve.onnx_runtime import OnnxPredictor
        columns = json.load(open({str(tmp_path / "columns.json")!r}))
        out = OnnxPredictor({str(predictor.model_path)!r}).predict(columns)
        assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules
                       if sys.modules[name] is not None)
        print(json.dumps({{k: v.tolist() for k, v in out.items()}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    found = {k: np.asarray(v) for k, v in json.loads(done.stdout).items()}
    expected = predict_arrays(trained.model, trained.tasks, trained.preprocess(raw))
    assert_same(expected, {k: found[k].astype(expected[k].dtype) for k in expected})


TEXTS = [
    "The café was great, but the service wasn't!",
    "  ÉLAN vital — naïve coöperation 42x... ",
    "",
    "unseen-word zxqv qqqqqqq, 你好 world",
    "a " * 40,
    "[UNK] in the text and [PAD]",
]


@pytest.mark.parametrize("model", ["wordpiece", "bpe"])
def test_tokenizer_matches_hugging_face_tokenizers(model: str) -> None:
    from polytask.data.text import TextTokenizer

    tokenizer = TextTokenizer(model=model, vocab_size=80, max_length=12)
    tokenizer.fit(["the cafe was great but the service was not", "naive cooperation world"] * 3)
    spec = json.loads(tokenizer.tokenizer.to_str())
    ours = SubwordTokenizer(spec, max_length=12)
    for text in TEXTS:
        assert ours.encode(text) == tokenizer.transform([text])[0].tolist(), text


def test_pretrained_bert_tokenizer_matches() -> None:
    """The shipped pretrained text model's tokenizer (BERT WordPiece, [CLS]/[SEP] template;
    scripts/setup.sh installs its package)."""
    from polytask.data.text import TextTokenizer

    tokenizer = TextTokenizer(pretrained="all-minilm-l6-v2", max_length=16)
    tokenizer.fit([])
    ours = SubwordTokenizer(json.loads(tokenizer.tokenizer.to_str()), max_length=16)
    for text in TEXTS:
        assert ours.encode(text) == tokenizer.transform([text])[0].tolist(), text
