"""``--jobs J``: J worker processes on this machine, each running trials of the same study
against the same storage (Optuna's own distributed mode: the storage is the only thing they
share), each with ``cores // J`` torch threads so that the machine is never oversubscribed.

The workers are started with ``spawn`` (a fresh interpreter: no forked torch thread pools or
open database connections). Each stops when the study holds the asked number of finished
trials; trials already running then finish, so up to J - 1 more trials than asked may end up
in the study.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any

__all__ = ["available_cores", "run_in_processes", "threads_per_job"]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Torch threads per worker: ``max(1, cores // jobs)``.

    >>> threads_per_job(2, cores=16), threads_per_job(3, cores=2)
    (8, 1)
    """
    return max(1, (cores or available_cores()) // jobs)


def _worker(spec: Any, worker: int, threads: int, n_trials: int) -> int:
    """One worker process: ``threads`` torch threads, trials until the study is done."""
    import torch

    torch.set_num_threads(threads)
    study = spec.open(worker)
    spec.optimize(study, n_trials)
    return worker


def run_in_processes(
    spec: Any, jobs: int, n_trials: int, *, on_poll: Callable[[int], None] | None = None
) -> None:
    """Run the study ``spec`` describes (a ``StudySpec``) in ``jobs`` processes until it holds
    ``spec.total`` finished trials; ``on_poll`` gets the number of finished trials every
    second. An error in a worker (e.g. a ``ConfigError``) stops the others and is raised here."""
    from polytask.tune.study import finished_trials

    threads = threads_per_job(jobs)
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(jobs)
    try:
        results = [pool.apply_async(_worker, (spec, i + 1, threads, n_trials)) for i in range(jobs)]
        study = spec.open() if on_poll is not None else None
        while results:
            results[0].wait(timeout=1.0)
            for result in [r for r in results if r.ready()]:
                result.get()  # a worker's error, raised here
                results.remove(result)
            if study is not None and on_poll is not None:
                on_poll(finished_trials(study))
        pool.close()
    finally:
        pool.terminate()  # after an error or Ctrl-C: no worker goes on training
        pool.join()
