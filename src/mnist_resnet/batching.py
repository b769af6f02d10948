"""Dynamic micro-batching: requests' images are answered by one model call per batch.

Each request hands its images to `MicroBatcher.submit` and awaits the answer. One worker thread
takes the oldest waiting request, adds whatever else waits (up to `max_batch` images, for at
most `max_delay_s` after the first) and runs the model once for all of them. Under load, requests
queue while the model runs, so batches grow with the load and the per-image cost falls; when idle,
a request waits at most `max_delay_s` (TorchServe's `batch_size` / `max_batch_delay`, BentoML's
adaptive batching). The model runs off the event loop, one call at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Images = NDArray[np.uint8]
Scores = NDArray[np.float32]


@dataclass
class _Job:
    images: Images
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Scores]


class BatcherClosed(RuntimeError):
    """The batcher was closed (the server is shutting down) before the request was answered."""


class MicroBatcher:
    """Answers `submit(images)` with `run(all waiting images)[rows of these images]`.

    `run` takes (N, 28, 28) uint8 and returns (N, classes) float32; `observe(n)` is told the size
    of every batch (the server's batch-size histogram).
    """

    def __init__(
        self,
        run: Callable[[Images], Scores],
        *,
        max_batch: int = 64,
        max_delay_s: float = 0.002,
        observe: Callable[[int], None] = lambda n: None,
    ) -> None:
        if max_batch < 1 or not 0.0 <= max_delay_s <= 1.0:
            raise ValueError("max_batch must be >= 1 and max_delay_s in [0, 1]")
        self.run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.observe = observe
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="micro-batcher", daemon=True)
        self._thread.start()

    async def submit(self, images: Images) -> Scores:
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        loop = asyncio.get_running_loop()
        job = _Job(images, loop, loop.create_future())
        self._jobs.put(job)
        return await job.future

    def close(self, timeout: float = 10.0) -> None:
        """Answer what is queued, then stop the worker thread."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            self._thread.join(timeout)

    def _serve(self) -> None:
        carried: _Job | None = None
        while True:
            first = carried if carried is not None else self._jobs.get()
            carried = None
            if first is None:
                return
            batch, carried, stop = self._gather(first)
            self._answer(batch)
            if stop:
                self._answer_rest()
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        """The jobs of one batch, a job that did not fit (the next batch's first), and whether
        the close sentinel was met."""
        batch = [first]
        count = len(first.images)
        deadline = time.monotonic() + self.max_delay_s
        while count < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get(False)
            except queue.Empty:
                break
            if job is None:
                return batch, None, True
            if count + len(job.images) > self.max_batch:
                return batch, job, False
            batch.append(job)
            count += len(job.images)
        return batch, None, False

    def _answer(self, batch: list[_Job]) -> None:
        try:
            parts = [job.images for job in batch]
            images = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self.observe(len(images))
            scores = self.run(images)
        except Exception as e:  # every waiting request learns of the failure, none hangs
            for job in batch:
                _reply(job, None, e)
            return
        start = 0
        for job in batch:
            rows = scores[start : start + len(job.images)]
            start += len(job.images)
            _reply(job, rows, None)

    def _answer_rest(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _reply(job, None, BatcherClosed("the server is shutting down"))


def _reply(job: _Job, result: Scores | None, error: Exception | None) -> None:
    # A closed event loop (RuntimeError) means nobody waits for this answer any more.
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)


def _settle(future: asyncio.Future[Any], result: Scores | None, error: Exception | None) -> None:
    if future.done():  # the request gave up (timeout, disconnect) while its batch ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
