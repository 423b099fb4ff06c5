"""The HTTP service: a FastAPI app that predicts every task of a trained run.

``create_app(run_dir, ...)`` loads the run's model (PyTorch, or the exported ONNX model) and
returns the app; ``polytask serve`` runs it on uvicorn. Endpoints: ``POST /predict`` (JSON
rows), ``POST /predict/file`` (a CSV or Parquet upload), ``GET /health``, ``GET /metadata``.
Requests are validated against models generated from the run's input schema before they reach
the model; a bad request is a 413 or 422 whose JSON names the field and row, never a 500 with a
traceback. Concurrent requests are micro-batched (``polytask.serve.batching``).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which are
# the request models generated in `create_app`, at run time

import gc
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Body, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, TypeAdapter, ValidationError

from polytask import __version__
from polytask.errors import ConfigError, PolytaskError
from polytask.serve.batching import MicroBatcher
from polytask.serve.engines import Engine, EngineOutput, load_engine
from polytask.serve.http_files import read_upload, upload_records
from polytask.serve.onnx_runtime import file_sha256
from polytask.serve.schema import (
    OutputTask,
    columns_from_rows,
    error_location,
    request_model,
    response_model,
    row_model,
)

log = logging.getLogger("polytask.serve")

#: the environment variable through which ``polytask serve --workers N`` passes its settings to
#: each worker process (JSON of ``ServeSettings``)
SETTINGS_ENV = "POLYTASK_SERVE_SETTINGS"
#: at most this many problems are listed in one error response
MAX_PROBLEMS = 20
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class ServeSettings:
    """How the service runs a model: which engine, batching and request limits, API key."""

    engine: Literal["torch", "onnx"] = "torch"
    checkpoint: str = "best"
    #: most rows in one forward pass (concurrent requests are joined up to it)
    max_batch: int = 64
    #: how long the first request of a batch waits for others, in milliseconds
    max_wait_ms: float = 2.0
    #: most rows in one request (more: 413)
    max_rows: int = 10_000
    #: largest request body in bytes (more: 413)
    max_body_bytes: int = 16 * 1024 * 1024
    #: the environment variable holding the API key that ``X-API-Key`` must carry (None: open)
    api_key_env: str | None = None

    def check(self) -> None:
        """``ConfigError`` naming every setting out of range."""
        problems = [
            f"{name} must be >= {low}, found {getattr(self, name)}"
            for name, low in (("max_batch", 1), ("max_rows", 1), ("max_body_bytes", 1))
            if getattr(self, name) < low
        ]
        if self.max_wait_ms < 0:
            problems.append(f"max_wait_ms must be >= 0, found {self.max_wait_ms}")
        if self.engine not in ("torch", "onnx"):
            problems.append(f"engine must be torch or onnx, found {self.engine!r}")
        if problems:
            raise ConfigError("serve: " + "; ".join(problems))

    def api_key(self) -> str | None:
        """The API key from ``api_key_env``; ``ConfigError`` when that variable is unset."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(
                f"--api-key-env: the environment variable {self.api_key_env} is not set or empty"
            )
        return key


def create_app(
    run_dir: str | Path,
    settings: ServeSettings | None = None,
    *,
    engine: Engine | None = None,
) -> FastAPI:
    """The service for the run in ``run_dir`` (``settings``: defaults of ``ServeSettings``).
    ``engine`` is the loaded model to serve, if the caller has one already."""
    settings = settings or ServeSettings()
    settings.check()
    api_key = settings.api_key()
    if engine is None:
        engine = load_engine(run_dir, settings.engine, checkpoint=settings.checkpoint)
    batcher = MicroBatcher(
        engine.predict, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms
    )
    metadata = describe(engine, settings, run_name=Path(run_dir).name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.close()

    app = FastAPI(
        title=f"polytask: {metadata['run']}",
        version=str(metadata["model_version"]),
        description="Every task's prediction for rows of the run's inputs.",
        lifespan=lifespan,
    )
    app.state.engine, app.state.batcher, app.state.settings = engine, batcher, settings
    add_error_handlers(app)
    guard = [Depends(api_key_check(api_key))] if api_key else []
    add_routes(app, engine, batcher, settings, metadata, guard)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # type: ignore[arg-type]
    return app


def describe(engine: Engine, settings: ServeSettings, *, run_name: str) -> dict[str, Any]:
    """``GET /metadata``: tasks, input schema, model version and checksum, limits."""
    sha256 = file_sha256(engine.model_path)
    return {
        "run": getattr(engine, "run_name", run_name),
        "engine": engine.name,
        "model_file": engine.model_path.name,
        "model_version": sha256[:12],
        "model_sha256": sha256,
        "polytask_version": __version__,
        "tasks": [task.describe() for task in engine.tasks],
        "inputs": [spec.describe() for spec in engine.fields],
        "limits": {"max_rows": settings.max_rows, "max_body_bytes": settings.max_body_bytes},
        "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms},
    }


def add_routes(
    app: FastAPI,
    engine: Engine,
    batcher: MicroBatcher,
    settings: ServeSettings,
    metadata: dict[str, Any],
    guard: Sequence[Any],
) -> None:
    """The four endpoints, with request and response models from the engine's schema."""
    row = row_model(engine.fields)
    rows_of_file = TypeAdapter(list[row])  # type: ignore[valid-type]
    names = [task.name for task in engine.tasks]
    task_names = Literal[tuple(names)]  # type: ignore[valid-type]
    body_type = request_model(row, names)
    answer_type = response_model(engine.tasks)
    version = str(metadata["model_version"])
    errors: dict[int | str, dict[str, Any]] = {
        413: {"description": "body or rows over the limit"},
        422: {"description": "bad input"},
    }

    async def answer(rows: Sequence[BaseModel], tasks: Sequence[str] | None) -> JSONResponse:
        if len(rows) > settings.max_rows:
            raise HTTPException(
                413, f"{len(rows)} rows: over the limit of {settings.max_rows} rows per request"
            )
        output = await batcher.submit(columns_from_rows(rows, engine.fields))
        selected = [t for t in engine.tasks if tasks is None or t.name in tasks]
        return JSONResponse(response_body(output, selected, version))

    @app.post("/predict", response_model=answer_type, responses=errors, dependencies=guard)  # type: ignore[misc]
    async def predict(body: Annotated[body_type, Body()]) -> Any:  # type: ignore[valid-type]
        """Every task's prediction for JSON rows: ``{"rows": [{column: value}, ...], "tasks":
        [...]}`` or a bare list of rows."""
        if isinstance(body, list):
            return await answer(body, None)
        return await answer(body.rows, body.tasks)

    @app.post("/predict/file", response_model=answer_type, responses=errors, dependencies=guard)  # type: ignore[misc]
    async def predict_file(
        file: Annotated[UploadFile, File(description="a CSV or Parquet table of input rows")],
        tasks: Annotated[list[task_names] | None, Query()] = None,  # type: ignore[valid-type]
    ) -> Any:
        """Every task's prediction for the rows of an uploaded CSV or Parquet file."""
        frame = read_upload(file.filename, await file.read())
        if len(frame) > settings.max_rows:
            raise HTTPException(
                413, f"{len(frame)} rows: over the limit of {settings.max_rows} rows per request"
            )
        source = Path(file.filename or "upload.csv").name
        try:
            rows = rows_of_file.validate_python(upload_records(frame, engine.fields, source))
        except ValidationError as exc:
            return problem_response(exc.errors(), file_rows=True)
        return await answer(rows, tasks)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Whether the service is up, and which model it serves."""
        return {"status": "ok", "engine": engine.name, "model_version": version}

    @app.get("/metadata", dependencies=guard)  # type: ignore[misc]
    async def get_metadata() -> dict[str, Any]:
        """Tasks (kinds, classes, output columns), the input schema, the model's version and
        SHA-256, limits and batching."""
        return metadata


def response_body(
    output: EngineOutput, tasks: Sequence[OutputTask], version: str
) -> dict[str, Any]:
    """One object per row with ``tasks``' columns; the class probabilities of the multiclass
    tasks among them. A value that is not finite is ``null`` (JSON has no NaN)."""
    names = [column for task in tasks for column in task.columns]
    values = [_json_values(output.columns[name]) for name in names]
    body: dict[str, Any] = {
        "model_version": version,
        "predictions": [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)],
    }
    classes = [task.name for task in tasks if task.kind == "multiclass"]
    if classes:
        probabilities = [_json_values(output.probabilities[name]) for name in classes]
        body["probabilities"] = [
            dict(zip(classes, row, strict=True)) for row in zip(*probabilities, strict=True)
        ]
    return body


def _json_values(values: np.ndarray) -> list[Any]:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        cells = values.astype(object)
        cells[~np.isfinite(values)] = None
        return cells.tolist()  # type: ignore[no-any-return]
    return values.tolist()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- errors and guards
def problem_response(errors: Sequence[Any], *, file_rows: bool = False) -> JSONResponse:
    """422 naming each problem's row and field: ``{"detail": "<first problem>", "errors":
    [{"row", "field", "message"}, ...]}`` (at most ``MAX_PROBLEMS``; inputs are not echoed).
    Rows of a request are counted from 0 (the index in ``rows``), rows of a file from 1 (data
    rows, as ``polytask predict`` counts them)."""
    problems: list[dict[str, Any]] = []
    for error in errors[:MAX_PROBLEMS]:
        loc = tuple(error.get("loc", ()))
        if file_rows:
            row, field = (int(loc[0]) + 1, ".".join(map(str, loc[1:]))) if loc else (None, "")
        elif error.get("type") == "json_invalid":
            row, field = None, "body"
        else:
            row, field = error_location(loc)
        problems.append({"row": row, "field": field, "message": str(error.get("msg", "invalid"))})
    first = problems[0] if problems else {"row": None, "field": "", "message": "invalid request"}
    where = []
    if first["row"] is not None:
        where.append(f"data row {first['row']}" if file_rows else f"row {first['row']}")
    if first["field"]:
        where.append(f"field {first['field']!r}")
    detail = f"{', '.join(where)}: {first['message']}" if where else str(first["message"])
    return JSONResponse({"detail": detail, "errors": problems}, status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    """Validation errors and polytask's errors (bad input) → 422 naming the field and row;
    anything else → a logged generic 500, never a traceback in the response."""

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return problem_response(exc.errors())

    async def bad_input(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error while answering %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(PolytaskError, bad_input)
    app.add_exception_handler(Exception, internal_error)


def api_key_check(key: str) -> Callable[..., Awaitable[None]]:
    """A dependency refusing (401) a request whose ``X-API-Key`` header is not ``key``."""
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the service's API key")

    async def check(given: Annotated[str | None, Depends(header)]) -> None:
        if given is None or not secrets.compare_digest(given.encode(), key.encode()):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    return check


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (by its ``Content-Length``, or as it
    arrives when chunked) is answered 413 before the app reads it."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int
    ) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message, receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(send)
                return
        await self.app(scope, _replay(chunks, None, receive), send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {"detail": f"request body over the limit of {self.max_bytes} bytes"}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(chunks: list[bytes], last: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that gives the buffered body (or ``last``) once, then the real one."""
    pending: list[Message] = (
        [last]
        if last is not None
        else [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
    )

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def app_from_environment() -> FastAPI:
    """The app of ``polytask serve --workers N`` in each worker process: the run folder and
    ``ServeSettings`` from the environment variable ``SETTINGS_ENV`` (JSON)."""
    raw = json.loads(os.environ[SETTINGS_ENV])
    app = create_app(raw.pop("run_dir"), ServeSettings(**raw))
    # the objects made while loading (torch, the model, the app) never become garbage: keep
    # them out of the collector's full passes, which otherwise stall every request for ~0.7 s
    gc.freeze()
    return app


def settings_environment(run_dir: str | Path, settings: ServeSettings) -> str:
    """The value of ``SETTINGS_ENV`` for ``app_from_environment``."""
    return json.dumps({"run_dir": str(run_dir), **asdict(settings)})
