"""Prometheus metrics of the server (requests, latencies, batches, in flight), shared between
worker processes, and the middleware that measures and logs each request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnist_resnet.errors import printable
from mnist_resnet.serve.middleware import send_json

log = logging.getLogger("mnist_resnet.serve")

# prometheus_client's multiprocess mode: where the workers' metric files live.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """Prometheus metrics of one app, in a registry of its own (several apps, one process).

    Under `serve`, every worker process writes its values to files in the folder named by
    `PROMETHEUS_MULTIPROC_DIR`, and a scrape of any worker reads them all: one view of the whole
    server, whichever worker answers, that keeps the counts of workers that died."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.shared = bool(os.environ.get(MULTIPROC_ENV))
        self.latency = Histogram(
            "mnist_resnet_request_seconds",
            "Time from request to response, by endpoint",
            ["path"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.batch = Histogram(
            "mnist_resnet_batch_images",
            "Images per model forward",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.in_flight = Gauge(
            "mnist_resnet_requests_in_flight",
            "Requests being answered",
            registry=self.registry,
            multiprocess_mode="livesum",  # the live workers' requests, summed
        )
        self.responses = Counter(
            "mnist_resnet_responses",
            "Responses sent, by status code",
            ["code"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        if not self.shared:
            return bytes(generate_latest(self.registry))
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(every_worker))


class MeasureRequests:
    """Times every request, counts its response by status code (errors included) and logs each
    failed one in one line; an exception no handler turned into a response becomes a 500 and one
    line too, never a traceback. A client gone before its answer is counted as 499."""

    # Known endpoints by name; anything else is counted as "other", so a scan of random
    # paths cannot create a label per path.
    PATHS = ("/", "/predict", "/explain", "/health", "/livez", "/readyz", "/model", "/metrics")

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in self.PATHS else "other"
        started = time.perf_counter()
        status = 0
        detail = b""

        async def observed(message: Message) -> None:
            nonlocal status, detail
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif status >= 400 and len(detail) < 2048:
                detail += message.get("body", b"")
            try:
                await send(message)
            except Exception:  # the connection is gone: nobody to answer
                raise ClientGone() from None

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed)
        except ClientGone:
            status, detail = 499, b"the client went away before its answer"
        except Exception as e:
            reason = f"{type(e).__name__}: {_first_line(e)}"
            if status:  # too late for another answer
                status, detail = 500, reason.encode()
            else:
                status, detail = 500, b""
                with contextlib.suppress(Exception):
                    await send_json(send, 500, "internal error")
                detail = reason.encode()
        finally:
            self.metrics.in_flight.dec()
            self.metrics.responses.labels(code=str(status or 500)).inc()
            self.metrics.latency.labels(path=label).observe(time.perf_counter() - started)
        if status >= 400:
            method = printable(str(scope.get("method", "")))[:16]
            log.warning("%d %s %s: %s", status, method, printable(path[:200]), _reason(detail))


class ClientGone(Exception):
    """Sending the answer failed: the client closed its connection."""


def _first_line(e: BaseException) -> str:
    return printable((str(e).strip().splitlines() or [""])[0][:300])


def _reason(body: bytes) -> str:
    """The `detail` of a JSON error body, or its text, as one printable line."""
    text = body[:2048].decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
        text = parsed["detail"] if isinstance(parsed, dict) and "detail" in parsed else text
    except ValueError:
        pass
    return printable(str(text))[:300]
