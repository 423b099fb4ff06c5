"""Helpers of the tests that start several processes (DDP over gloo, a served app)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_processes(
    worker: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    nprocs: int = 2,
    start_method: str = "spawn",
    seconds: float = 300,
) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` processes and wait for them; a run that has not
    finished after ``seconds`` (a collective that hangs) is killed and fails the test."""
    context = mp.start_processes(
        worker, args=args, nprocs=nprocs, join=False, start_method=start_method
    )
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(
                f"the {nprocs}-process run did not finish in {seconds:g} s: a collective hangs"
            )
