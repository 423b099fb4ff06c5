"""API fuzzing: requests generated from the service's OpenAPI schema, valid ones and invalid
ones (schemathesis), never get a 5xx answer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from typer.testing import CliRunner

from polytask.cli import app as cli_app
from polytask.serve.app import ServeSettings, create_app

schemathesis = pytest.importorskip("schemathesis")

#: generated requests per operation and mode: enough to reach every validation path, few
#: enough for the suite
EXAMPLES = 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CSV recipe (numbers in, regression, binary and multiclass tasks out), one epoch."""
    out = tmp_path_factory.mktemp("fuzz")
    result = CliRunner().invoke(
        cli_app, ["train", "students-csv", "train.epochs=1", f"output_dir={out}", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    return out / "students"


def _fuzz(operation: Any, mode: Any, seen: set[int]) -> Callable[[], None]:
    """A hypothesis test calling ``operation`` with generated requests of ``mode``."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any) -> None:
        response = case.call()
        seen.add(response.status_code)
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        assert "Traceback" not in response.text

    return call  # type: ignore[no-any-return]


def test_generated_requests_never_get_a_5xx(run_dir: Path) -> None:
    app = create_app(run_dir, ServeSettings(max_rows=20, max_body_bytes=20_000, max_wait_ms=0))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: dict[tuple[str, str], set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            seen = statuses.setdefault((operation.label, mode.value), set())
            try:
                _fuzz(operation, mode, seen)()
            except Unsatisfiable:  # no invalid request exists (GET /health takes no input)
                assert mode == schemathesis.GenerationMode.NEGATIVE
                assert operation.label.startswith("GET ")
    # valid rows were predicted, invalid requests refused
    assert 200 in statuses[("POST /predict", "positive")]
    assert statuses[("POST /predict", "negative")] & {400, 413, 422}
    assert statuses[("POST /predict/file", "negative")] & {400, 413, 422}
    assert statuses[("GET /metadata", "positive")] == {200}
