"""``polytask serve``: predict every task over HTTP (FastAPI on uvicorn)."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Annotated

import typer

from polytask.cli.app import command, err
from polytask.errors import ConfigError

#: how long a worker of ``--workers N`` may take to load before uvicorn restarts it
WORKER_START_SECONDS = 300


@command
def serve(
    run_dir: Annotated[Path, typer.Argument(help="a run folder made by `polytask train`")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="server processes (each loads the model)")] = 1,
    engine: Annotated[
        str, typer.Option(help="torch (the checkpoint) or onnx (RUN_DIR/export/model.onnx)")
    ] = "torch",
    checkpoint: Annotated[str, typer.Option(help="best or last (torch engine)")] = "best",
    max_batch: Annotated[
        int, typer.Option(help="most rows in one forward pass; 1 turns micro-batching off")
    ] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(help="how long a request waits for others to share its forward")
    ] = 2.0,
    max_rows: Annotated[int, typer.Option(help="most rows in one request (more: 413)")] = 10_000,
    max_body_bytes: Annotated[
        int, typer.Option(help="largest request body in bytes (more: 413)")
    ] = 16 * 1024 * 1024,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="environment variable holding the key the X-API-Key header must carry"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level")] = "info",
) -> None:
    """Serve a trained run over HTTP: POST /predict (JSON rows), POST /predict/file (CSV or
    Parquet), GET /health, GET /metadata; the OpenAPI schema and docs at /docs."""
    import uvicorn

    from polytask.serve.app import (
        SETTINGS_ENV,
        ServeSettings,
        create_app,
        settings_environment,
    )

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, found {workers}")
    settings = ServeSettings(
        engine=engine,  # type: ignore[arg-type]  # checked by create_app
        checkpoint=checkpoint,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_rows=max_rows,
        max_body_bytes=max_body_bytes,
        api_key_env=api_key_env,
    )
    app = create_app(run_dir, settings)  # loads the model: a bad folder fails here, in one line
    gc.freeze()  # startup objects out of the full GC passes (see app_from_environment)
    err.print(
        f"serving {run_dir} ({engine} engine, {workers} worker(s)) on http://{host}:{port} "
        f"(docs at /docs)",
        highlight=False,
    )
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    os.environ[SETTINGS_ENV] = settings_environment(run_dir.resolve(), settings)
    uvicorn.run(
        "polytask.serve.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        # a worker loads torch and the model before it answers the supervisor's health check;
        # uvicorn's 5 s default kills it while it loads on a busy machine
        timeout_worker_healthcheck=WORKER_START_SECONDS,
    )
