"""`polytask serve`: the HTTP app (every endpoint, every validation error), micro-batching, the API
key, the ONNX engine, a real uvicorn server started by the command, and the README's curl."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from polytask.cli import app as cli_app
from polytask.run.folder import load_trained
from polytask.serve.app import ServeSettings, create_app
from polytask.serve.predict import predict_arrays
from processes import free_port as _free_port

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
STUDENTS_CSV = ROOT / "src" / "polytask" / "recipes" / "examples" / "students.csv"
FEATURES = ["hours_studied", "sleep_hours", "absences", "prior_score"]
COLUMNS = ["exam_score", "passed", "grade", "stressed"]


def _train(tmp: Path, *args: str) -> Path:
    result = runner.invoke(cli_app, ["train", *args, f"output_dir={tmp}", "--no-progress"])
    assert result.exit_code == 0, result.output
    (run,) = [p for p in tmp.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CSV recipe, trained for two epochs."""
    return _train(tmp_path_factory.mktemp("students"), "students-csv", "train.epochs=2")


@pytest.fixture(scope="module")
def client(students: Path) -> Any:
    with TestClient(create_app(students, ServeSettings(max_rows=100, max_body_bytes=50_000))) as c:
        yield c


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return pd.read_csv(STUDENTS_CSV).head(40)


def _expected(run: Path, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """``predict_arrays`` on the rows of ``frame`` (the reference the service must match)."""
    trained = load_trained(run)
    raw = np.array(frame[trained.feature_names], dtype=np.float32)
    return predict_arrays(trained.model, trained.tasks, trained.preprocess(raw))


def _assert_same(predictions: list[dict[str, Any]], expected: dict[str, np.ndarray]) -> None:
    assert len(predictions) == len(next(iter(expected.values())))
    for column, values in expected.items():
        got = np.array([p[column] for p in predictions])
        if values.dtype.kind in "iu":
            np.testing.assert_array_equal(got, values)
        else:
            np.testing.assert_allclose(got, values, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- endpoints
def test_health_and_metadata(client: TestClient, students: Path) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["engine"] == "torch"
    meta = client.get("/metadata").json()
    assert [t["name"] for t in meta["tasks"]] == COLUMNS
    kinds = {t["name"]: t["kind"] for t in meta["tasks"]}
    assert kinds == {
        "exam_score": "regression",
        "passed": "binary",
        "grade": "multiclass",
        "stressed": "binary",
    }
    assert meta["tasks"][2]["classes"] == [0, 1, 2, 3]
    assert [(f["name"], f["type"], f["required"]) for f in meta["inputs"]] == [
        (name, "number", True) for name in FEATURES
    ]
    checkpoint = (students / "checkpoints" / "best.safetensors").read_bytes()
    assert meta["model_sha256"] == hashlib.sha256(checkpoint).hexdigest()
    assert meta["model_version"] == health["model_version"] == meta["model_sha256"][:12]


def test_openapi_shows_the_real_fields(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    row = schemas["Row"]
    assert set(row["properties"]) == set(FEATURES) and set(row["required"]) == set(FEATURES)
    assert row["additionalProperties"] is False
    tasks = schemas["PredictRequest"]["properties"]["tasks"]
    assert tasks["anyOf"][0]["items"]["enum"] == COLUMNS
    assert set(schemas["Prediction"]["properties"]) == set(COLUMNS)


def test_predict_json_equals_predict_arrays(
    client: TestClient, students: Path, rows: pd.DataFrame
) -> None:
    records = rows[FEATURES].to_dict("records")
    expected = _expected(students, rows)
    body = client.post("/predict", json={"rows": records}).json()
    _assert_same(body["predictions"], expected)
    probabilities = np.array([p["grade"] for p in body["probabilities"]])
    assert probabilities.shape == (40, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected["grade"])
    bare = client.post("/predict", json=records[:3]).json()  # a list of records
    _assert_same(bare["predictions"], {k: v[:3] for k, v in expected.items()})


def test_predict_tasks_filter(client: TestClient, rows: pd.DataFrame) -> None:
    records = rows[FEATURES].head(2).to_dict("records")
    body = client.post("/predict", json={"rows": records, "tasks": ["passed"]}).json()
    assert [set(p) for p in body["predictions"]] == [{"passed"}, {"passed"}]
    assert "probabilities" not in body


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_predict_file_equals_predict_arrays(
    client: TestClient, students: Path, rows: pd.DataFrame, kind: str
) -> None:
    buffer = io.BytesIO()
    rows.to_csv(buffer, index=False) if kind == "csv" else rows.to_parquet(buffer)
    response = client.post(
        "/predict/file",
        files={"file": (f"rows.{kind}", buffer.getvalue())},
        params={"tasks": ["grade", "exam_score"]},
    )
    assert response.status_code == 200, response.text
    expected = _expected(students, rows)
    _assert_same(response.json()["predictions"], {c: expected[c] for c in ("exam_score", "grade")})


# ------------------------------------------------------------------------- validation
GOOD = {"hours_studied": 5.0, "sleep_hours": 7.0, "absences": 1, "prior_score": 60.0}


def _problem(response: httpx.Response, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert "Traceback" not in response.text
    return body


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({k: v for k, v in GOOD.items() if k != "absences"}, "absences", "Field required"),
        ({**GOOD, "sleep_hours": "seven"}, "sleep_hours", "valid number"),
        ({**GOOD, "sleep_hours": True}, "sleep_hours", "valid number"),
        ({**GOOD, "prior_score": 1e300}, "prior_score", "less than or equal"),
        ({**GOOD, "absense": 1}, "absense", "Extra inputs"),
    ],
)
def test_bad_row_names_field_and_row(
    client: TestClient, row: dict[str, Any], field: str, message: str
) -> None:
    body = _problem(client.post("/predict", json={"rows": [GOOD, GOOD, row]}))
    assert body["errors"][0]["row"] == 2 and body["errors"][0]["field"] == field
    assert message in body["errors"][0]["message"]
    assert body["detail"].startswith(f"row 2, field '{field}'")


def test_nan_is_refused(client: TestClient) -> None:
    text = json.dumps({"rows": [GOOD, {**GOOD, "hours_studied": float("nan")}]})
    body = _problem(
        client.post("/predict", content=text, headers={"content-type": "application/json"})
    )
    assert body["errors"][0] == {
        "row": 1,
        "field": "hours_studied",
        "message": "Input should be a finite number",
    }


def test_unknown_task_and_bad_json(client: TestClient) -> None:
    body = _problem(client.post("/predict", json={"rows": [GOOD], "tasks": ["grade", "mood"]}))
    assert body["errors"][0]["field"] == "tasks[1]" and "'grade'" in body["errors"][0]["message"]
    body = _problem(client.post("/predict/file", params={"tasks": ["mood"]}, files={"file": b""}))
    assert body["errors"][0]["field"] == "tasks[0]"
    bad = client.post(
        "/predict", content=b'{"rows": [', headers={"content-type": "application/json"}
    )
    assert _problem(bad)["errors"][0]["field"] == "body"
    assert _problem(client.post("/predict", json={"rows": []}))["errors"][0]["field"] == "rows"


def test_limits_answer_413(client: TestClient) -> None:
    body = _problem(client.post("/predict", json=[GOOD] * 101), 413)
    assert body["detail"] == "101 rows: over the limit of 100 rows per request"
    big = json.dumps({"rows": [GOOD] * 101, "padding": "x" * 60_000})
    body = _problem(
        client.post("/predict", content=big, headers={"content-type": "application/json"}), 413
    )
    assert body["detail"] == "request body over the limit of 50000 bytes"
    table = pd.DataFrame([GOOD] * 101).to_csv(index=False).encode()
    assert _problem(client.post("/predict/file", files={"file": ("r.csv", table)}), 413)


def test_bad_files_name_the_column_and_row(client: TestClient, rows: pd.DataFrame) -> None:
    def upload(frame: pd.DataFrame, name: str = "rows.csv") -> dict[str, Any]:
        content = frame.to_csv(index=False).encode()
        return _problem(client.post("/predict/file", files={"file": (name, content)}))

    body = upload(rows.drop(columns=["absences"]))
    assert body["detail"] == (
        "rows.csv: missing column(s) 'absences'; the model needs hours_studied, sleep_hours, "
        "absences, prior_score"
    )
    bad = rows.head(5).astype({"sleep_hours": object})
    bad.loc[3, "sleep_hours"] = "late"
    body = upload(bad)
    assert body["errors"][0]["row"] == 4 and body["errors"][0]["field"] == "sleep_hours"
    assert body["detail"].startswith("data row 4, field 'sleep_hours'")
    empty = rows.head(5).copy()
    empty.loc[1, "prior_score"] = None
    assert upload(empty)["errors"][0] == {
        "row": 2,
        "field": "prior_score",
        "message": "Input should be a valid number",
    }
    assert "unknown file type" in upload(rows, "rows.xlsx")["detail"]
    assert "no rows" in upload(rows.head(0))["detail"]


# ------------------------------------------------------------------------- micro-batching
def test_micro_batching_joins_concurrent_requests(students: Path, rows: pd.DataFrame) -> None:
    app = create_app(students, ServeSettings(max_batch=64, max_wait_ms=50))
    records = rows[FEATURES].to_dict("records")
    expected = _expected(students, rows)

    async def ask_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as http:
            sizes = [1 + i % 3 for i in range(20)]  # requests of 1, 2 or 3 rows
            starts = np.cumsum([0, *sizes])
            asks = [
                http.post("/predict", json=records[starts[i] : starts[i] + n])
                for i, n in enumerate(sizes)
            ]
            answers = await asyncio.gather(*asks)
            for i, answer in enumerate(answers):  # each caller gets its own rows back
                lo, hi = starts[i], starts[i] + sizes[i]
                _assert_same(
                    answer.json()["predictions"], {k: v[lo:hi] for k, v in expected.items()}
                )
            return answers

    asyncio.run(ask_all())
    batcher = app.state.batcher
    assert batcher.requests == 20
    assert 1 <= batcher.forward_calls < 20


def test_max_batch_one_is_one_forward_per_request(students: Path) -> None:
    app = create_app(students, ServeSettings(max_batch=1, max_wait_ms=50))

    async def ask_all() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as http:
            await asyncio.gather(*[http.post("/predict", json=[GOOD]) for _ in range(8)])

    asyncio.run(ask_all())
    assert app.state.batcher.forward_calls == app.state.batcher.requests == 8


def test_a_failing_request_fails_alone() -> None:
    """A batch whose forward fails is run again request by request: only the request with the
    bad input gets the error, the others their own rows."""
    from polytask.errors import DataError
    from polytask.serve.batching import MicroBatcher
    from polytask.serve.engines import EngineOutput

    def double(columns: Any) -> EngineOutput:
        x = np.asarray(columns["x"])
        if (x < 0).any():
            raise DataError(f"row {int(np.flatnonzero(x < 0)[0])}: negative")
        return EngineOutput({"y": 2 * x}, {})

    batcher = MicroBatcher(double, max_batch=64, max_wait_ms=20)

    async def ask_all() -> list[Any]:
        asks = [batcher.submit({"x": np.array([i, i + 0.5])}) for i in (1, 2, -3, 4)]
        return await asyncio.gather(*asks, return_exceptions=True)

    answers = asyncio.run(ask_all())
    assert isinstance(answers[2], DataError)
    for i, answer in zip((1, 2, 4), (answers[0], answers[1], answers[3]), strict=True):
        np.testing.assert_array_equal(answer.columns["y"], [2 * i, 2 * i + 1])
    assert batcher.forward_calls == 1 + 4  # the joint try, then each request alone


# ------------------------------------------------------------------------- API key, engines
def test_api_key(students: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SERVE_KEY", "s3cret")
    with TestClient(create_app(students, ServeSettings(api_key_env="TEST_SERVE_KEY"))) as c:
        assert c.post("/predict", json=[GOOD]).status_code == 401
        wrong = c.post("/predict", json=[GOOD], headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401 and wrong.json()["detail"].startswith("missing or wrong")
        assert c.get("/metadata").status_code == 401
        assert c.post("/predict", json=[GOOD], headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # open, for load balancers
    monkeypatch.delenv("TEST_SERVE_KEY")
    result = runner.invoke(cli_app, ["serve", str(students), "--api-key-env", "TEST_SERVE_KEY"])
    assert result.exit_code == 1
    assert "the environment variable TEST_SERVE_KEY is not set" in result.output


def test_cli_refuses_bad_settings_in_one_line(students: Path, tmp_path: Path) -> None:
    for args, message in [
        ([str(tmp_path)], "no checkpoints/best.safetensors"),
        ([str(students), "--engine", "tensorflow"], "engine must be torch or onnx"),
        ([str(students), "--max-batch", "0"], "max_batch must be >= 1"),
        ([str(students), "--engine", "onnx"], "no ONNX model; run `polytask export"),
    ]:
        result = runner.invoke(cli_app, ["serve", *args])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output


def test_onnx_engine_answers_like_torch(students: Path, rows: pd.DataFrame, tmp_path: Path) -> None:
    from polytask.serve.engines import load_engine
    from polytask.serve.export import export_onnx

    exported = export_onnx(students, tmp_path / "model.onnx")
    onnx = load_engine(students, "onnx", onnx_model=exported.model_path)
    records = rows[FEATURES].to_dict("records")
    with TestClient(create_app(students, engine=onnx)) as client:
        meta = client.get("/metadata").json()
        body = client.post("/predict", json=records).json()
    assert meta["engine"] == "onnx" and meta["model_file"] == "model.onnx"
    expected = _expected(students, rows)
    for column, values in expected.items():
        got = np.array([p[column] for p in body["predictions"]])
        np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-5)
    probabilities = np.array([p["grade"] for p in body["probabilities"]])
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected["grade"])


# ------------------------------------------------------------------------- other input kinds
def test_text_model(tmp_path: Path) -> None:
    run = _train(
        tmp_path,
        "text-two-task",
        "data.params.num_samples=200",
        "data.params.tokenizer.vocab_size=100",
        "data.params.tokenizer.max_length=12",
        "model.encoder_params.d_model=16",
        "model.encoder_params.heads=2",
        "model.encoder_params.layers=1",
        "model.encoder_params.feedforward=32",
        "train.epochs=1",
    )
    texts = ["the pasta was not bad at all", "a great match, but the seats were awful", ""]
    trained = load_trained(run)
    expected = predict_arrays(trained.model, trained.tasks, trained.preprocess({"text": texts}))
    with TestClient(create_app(run)) as client:
        meta = client.get("/metadata").json()
        assert meta["inputs"] == [{"name": "text", "type": "text", "required": True}]
        body = client.post("/predict", json=[{"text": t} for t in texts]).json()
        _assert_same(body["predictions"], expected)
        wrong = _problem(client.post("/predict", json=[{"text": "fine"}, {"text": 5}]))
        assert wrong["errors"][0]["row"] == 1 and wrong["errors"][0]["field"] == "text"
        assert "valid string" in wrong["errors"][0]["message"]


def test_categorical_model_takes_unknown_and_missing_categories(tmp_path: Path) -> None:
    run = _train(tmp_path, "recsys-mmoe", "data.params.num_impressions=1500", "train.epochs=1")
    trained = load_trained(run)
    names = trained.categorical_names or []
    vocab = trained.preprocessors["categorical"].vocab  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    numeric = rng.normal(size=(4, len(trained.feature_names or []))).astype(np.float32)
    categories = np.array(
        [[v[i % len(v)] for v in vocab] for i in range(3)] + [["never-seen"] * len(names)],
        dtype=object,
    )
    categories[1, 0] = None  # missing: the unknown code, as in training
    categories[2, 1] = int(categories[2, 1]) if str(categories[2, 1]).isdigit() else "x"
    expected = predict_arrays(
        trained.model,
        trained.tasks,
        trained.preprocess({"numeric": numeric, "categorical": categories}),
    )
    records = [
        {
            **dict(zip(trained.feature_names or [], map(float, n), strict=True)),
            **dict(zip(names, c, strict=True)),
        }
        for n, c in zip(numeric, categories, strict=True)
    ]
    del records[1][names[0]]  # an absent category is a missing one
    with TestClient(create_app(run)) as client:
        meta = client.get("/metadata").json()
        required = {f["name"]: f["required"] for f in meta["inputs"]}
        assert required == {
            **dict.fromkeys(trained.feature_names or [], True),
            **dict.fromkeys(names, False),
        }
        body = client.post("/predict", json=records).json()
    _assert_same(body["predictions"], expected)


def test_multimodal_model_takes_missing_modalities(tmp_path: Path) -> None:
    run = _train(
        tmp_path,
        "multimodal",
        "data.params.num_train=60",
        "data.params.num_val=20",
        "data.params.num_test=20",
        "train.epochs=1",
    )
    trained = load_trained(run)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 1, 8, 8)).astype(np.float32)
    sounds = 0.1 * rng.normal(size=(3, 3200)).astype(np.float32)
    rows: list[dict[str, Any]] = [
        {"image": images[i].ravel().tolist(), "audio": sounds[i].tolist()} for i in range(3)
    ]
    rows[1]["audio"] = None  # a missing modality: zeros, flagged absent, as in the dataset
    del rows[2]["image"]  # an absent field is a missing modality too
    images[2], sounds[1] = 0.0, 0.0
    present = {
        "image_present": np.array([1, 1, 0], bool),
        "audio_present": np.array([1, 0, 1], bool),
    }
    raw = {"image": images, "audio": sounds, **present}
    expected = predict_arrays(trained.model, trained.tasks, trained.preprocess(raw))
    with TestClient(create_app(run)) as client:
        inputs = client.get("/metadata").json()["inputs"]
        assert [(f["name"], f["type"], f["required"], f["shape"]) for f in inputs] == [
            ("image", "tensor", False, [1, 8, 8]),
            ("audio", "tensor", False, [3200]),
        ]
        _assert_same(client.post("/predict", json=rows).json()["predictions"], expected)
        short = _problem(client.post("/predict", json=[{"image": [0.0] * 5}]))
        assert short["errors"][0]["row"] == 0 and short["errors"][0]["field"] == "image"
        assert "at least 64 items" in short["errors"][0]["message"]


# ------------------------------------------------------------------------- the command itself
def _readme_curl() -> str:
    """The curl command of the README's "Serve it" section, joined onto one line."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Serve it", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"^curl .*?'\s*$", section.replace("\\\n", " "), re.M)
    return command


def test_polytask_serve_answers_the_readme_curl(students: Path, tmp_path: Path) -> None:
    """`polytask serve` in a real uvicorn process; the README's curl body gets the predictions
    `polytask predict` writes for the same row."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polytask",
            "serve",
            str(students),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start in 90 s"
            time.sleep(0.2)
        curl = shlex.split(_readme_curl().replace("localhost:8000", base))
        body = json.loads(curl[curl.index("-d") + 1])
        answer = httpx.post(f"{base}/predict", json=body, timeout=10).json()
        if shutil.which("curl"):  # the command itself, as the README gives it
            run = subprocess.run(curl, capture_output=True, text=True, timeout=30, check=True)
            assert json.loads(run.stdout) == answer
    finally:
        server.terminate()
        server.wait(timeout=30)
    frame = pd.DataFrame(body["rows"])
    frame.to_csv(tmp_path / "rows.csv", index=False)
    result = runner.invoke(
        cli_app,
        ["predict", str(students), str(tmp_path / "rows.csv"), "-o", str(tmp_path / "out.csv")],
    )
    assert result.exit_code == 0, result.output
    written = pd.read_csv(tmp_path / "out.csv")
    _assert_same(answer["predictions"], {c: written[c].to_numpy() for c in COLUMNS})
    _assert_same(answer["predictions"], _expected(students, frame))
