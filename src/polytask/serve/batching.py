"""Micro-batching: concurrent requests share one forward pass.

Each request puts its rows on an asyncio queue and waits. One consumer task takes the first
waiting request, then keeps taking requests until the batch holds ``max_batch`` rows or
``max_wait_ms`` have passed since it took the first, concatenates their columns, runs the
engine once in a worker thread (the event loop keeps accepting requests meanwhile, and they
form the next batch) and gives each request back its own rows. A request is never split: one
larger than ``max_batch`` runs alone. ``max_batch=1`` is one-request-one-forward.

The wait adapts to the load: after a batch of one request (a lone client, a quiet service) the
next request does not wait for company, so a quiet service answers without the extra
``max_wait_ms``; requests that arrive while a forward runs still join the next batch, and once a
batch holds several requests the next one waits again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from polytask.errors import ConfigError
from polytask.serve.engines import EngineOutput, number_of_rows

Predict = Callable[[Mapping[str, Any]], EngineOutput]


@dataclass
class _Job:
    columns: Mapping[str, Any]
    rows: int
    result: asyncio.Future[EngineOutput]


def concat_columns(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Columns of several requests, one after the other (arrays concatenated; a column given as
    a list, such as an optional modality with missing rows, as one list)."""
    if len(parts) == 1:
        return dict(parts[0])
    joined: dict[str, Any] = {}
    for name in parts[0]:
        values = [part[name] for part in parts]
        if all(isinstance(v, np.ndarray) for v in values):
            joined[name] = np.concatenate(values)
        else:
            joined[name] = [item for value in values for item in value]
    return joined


def slice_output(output: EngineOutput, start: int, stop: int) -> EngineOutput:
    """Rows ``start:stop`` of a batch's predictions."""
    return EngineOutput(
        {name: values[start:stop] for name, values in output.columns.items()},
        {name: values[start:stop] for name, values in output.probabilities.items()},
    )


class MicroBatcher:
    """Runs ``predict`` on batches of concurrent requests, one batch at a time, in one worker
    thread. ``forward_calls`` and ``requests`` count what it did (for tests and metrics)."""

    def __init__(self, predict: Predict, *, max_batch: int = 64, max_wait_ms: float = 2.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ConfigError(
                f"micro-batching: need max_batch >= 1 and max_wait_ms >= 0, found {max_batch} "
                f"and {max_wait_ms}"
            )
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.forward_calls = 0
        self.requests = 0
        #: whether the last batch held several requests (then the next one waits for company)
        self._busy = True
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polytask-forward")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._consumer: asyncio.Task[None] | None = None

    async def submit(self, columns: Mapping[str, Any]) -> EngineOutput:
        """The predictions for the rows of ``columns``, computed with other waiting requests."""
        queue = self._running_queue()
        job = _Job(columns, number_of_rows(columns), asyncio.get_running_loop().create_future())
        self.requests += 1
        queue.put_nowait(job)
        return await job.result

    def _running_queue(self) -> asyncio.Queue[_Job]:
        """The queue of the consumer in the running event loop (started on first use, so the app
        works with or without its lifespan, e.g. in a test client)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._queue is None or self._consumer is None:
            self._loop, self._queue = loop, asyncio.Queue()
            self._consumer = loop.create_task(self._consume(self._queue))
        return self._queue

    async def _consume(self, queue: asyncio.Queue[_Job]) -> None:
        waiting: _Job | None = None
        while True:
            first = waiting or await queue.get()
            jobs, waiting = await self._gather(queue, first)
            await self._run(jobs)

    async def _gather(
        self, queue: asyncio.Queue[_Job], first: _Job
    ) -> tuple[list[_Job], _Job | None]:
        """``first`` and the requests that join it; the request that did not fit, if any."""
        loop = asyncio.get_running_loop()
        wait = self.max_wait if self._busy else 0.0
        jobs, rows, deadline = [first], first.rows, loop.time() + wait
        while rows < self.max_batch:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:  # Python 3.10: not the builtin TimeoutError
                    break
            if rows + job.rows > self.max_batch:
                self._busy = True
                return jobs, job
            jobs.append(job)
            rows += job.rows
        self._busy = len(jobs) > 1
        return jobs, None

    async def _run(self, jobs: list[_Job]) -> None:
        """One forward for ``jobs``; each gets its rows, or the error. When a batch fails, its
        requests are run again one by one, so that one request's bad input fails only itself."""
        loop = asyncio.get_running_loop()
        try:
            columns = concat_columns([job.columns for job in jobs])
            self.forward_calls += 1
            output = await loop.run_in_executor(self._executor, self.predict, columns)
        except Exception as exc:  # the callers turn it into a response
            if len(jobs) > 1:
                for job in jobs:
                    await self._run([job])
                return
            if not jobs[0].result.done():
                jobs[0].result.set_exception(exc)
            return
        start = 0
        for job in jobs:
            if not job.result.done():  # a caller that went away is skipped
                job.result.set_result(slice_output(output, start, start + job.rows))
            start += job.rows

    async def close(self) -> None:
        """Stop the consumer and the worker thread."""
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._consumer
        self._consumer = self._queue = self._loop = None
        self._executor.shutdown(wait=False)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polytask-forward")
