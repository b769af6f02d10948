"""HTTP API (FastAPI on Granian) and the draw-a-digit page; the model is loaded once per process.

Endpoints: `POST /predict` (image uploads, or JSON 28x28 pixel arrays; batches allowed),
`GET /health`, `/livez`, `/readyz`, `/model`, `/metrics` (Prometheus), `/openapi.json`, and
`GET /` (the page, assets beside this file, nothing from a CDN). Bodies over `MAX_BODY_BYTES`
get 413, unreadable images 400, unusable content (blank canvas, wrong shape) 422. Each request
costs bounded memory and time: see `MAX_UPLOAD_PIXELS`, `image_threads` and `ServeConfig`'s
timeouts. Requests' images are answered in micro-batches (batching.py).

Granian serves it: its HTTP layer (Rust, hyper) closes connections that do not send their
headers in time, so idle or slow clients cannot hold the server (uvicorn has no such timeout:
docs/serving.md), and it runs several worker processes for several cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnist_resnet.batching import BatcherClosed, MicroBatcher
from mnist_resnet.checkpoint import LoadedModel, load_model
from mnist_resnet.config import ServeConfig, from_dict, to_dict
from mnist_resnet.errors import printable
from mnist_resnet.files import hash_file
from mnist_resnet.images import (
    IMAGE_SIZE,
    BlankImage,
    ImageError,
    decode_opened,
    open_image,
    prepare_image,
    preprocess_pixels,
)
from mnist_resnet.inference import Scorer, onnx_scorer, torch_scorer
from mnist_resnet.ood import VERDICTS, verdict
from mnist_resnet.predict import Ranked
from mnist_resnet.runtime import available_cpus, return_freed_memory, trim_freed_memory

MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_BATCH = 64
TOP_K = 3
# Pixels one request may have decoded, all its images together, checked from their headers
# before any is decoded. An upload is decoded at full size before it is reduced (PNG and WebP
# cannot decode smaller), so the server takes far fewer than `predict` does: 4 MP is 16 MB as
# RGBA and about 0.1 s of lossless WebP decoding, a 4000 x 4000 one 0.3-0.5 s (docs/serving.md).
MAX_UPLOAD_PIXELS = 4_000_000
# A body larger than this leaves its memory to be handed back to the OS once it is answered.
TRIM_BYTES = 1024 * 1024
log = logging.getLogger("mnist_resnet.serve")


def image_threads(workers: int) -> int:
    """Images decoded and prepared at once per worker process: the cores shared out between the
    workers, at least one. Bounds memory at about this many full-size decodes per worker, and
    with more threads than cores they only fight over the GIL: on 2 cores with 2 workers, two
    image threads each gave a PNG p99 of 382 ms, one each 258 ms (docs/serving.md)."""
    return max(1, available_cpus() // max(1, workers))


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # The page loads its own script and style only, and posts to this origin.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    ),
}
T = TypeVar("T")
# 64 images of 28x28 as JSON are about 300 KB; bodies beyond this are parsed off the event loop.
LARGE_JSON_BYTES = 512 * 1024
# How `serve` hands its settings to Granian's worker processes, which build the app themselves.
SETTINGS_ENV = "MNIST_RESNET_SERVE"
# prometheus_client's multiprocess mode: where the workers' metric files live.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STATIC_DIR = Path(str(resources.files("mnist_resnet") / "static"))


class PixelBatch(BaseModel):
    """28x28 images as nested lists of 0..255 values, white ink on black like MNIST."""

    images: list[list[list[float]]] = Field(
        ..., description="one or more 28x28 arrays, values 0..255", min_length=1
    )
    preprocess: bool = Field(
        False,
        description="prepare each image as the model's training images were first (MNIST-style: "
        "polarity, crop, scale, centre; or a plain resize for a model trained with "
        "--preprocess resize); off: the pixels are used as they are",
    )
    top_k: int = Field(TOP_K, ge=1, le=10)


class Candidate(BaseModel):
    # "class" is the natural JSON key but a Python keyword: built from a dict, read by alias.
    label: str = Field(..., alias="class")
    index: int
    probability: float


class ImagePrediction(BaseModel):
    prediction: str
    top: list[Candidate]
    verdict: str = Field(
        ...,
        description=f"one of {', '.join(VERDICTS)}: out_of_distribution when the image is unlike "
        "the training images (not a digit), unsure when the calibrated top probability is low",
    )
    ood_score: float = Field(..., description="higher: less like the training images")


class PredictResponse(BaseModel):
    predictions: list[ImagePrediction]


class BodyBudget:
    """Bytes of request bodies one worker holds at once, counted as they arrive: bodies are read
    before a request is admitted to the image work, so this, not the admission limit, is what
    bounds their memory (one event loop per worker: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class BodyIncomplete(HTTPException):
    """The body stopped before its end: the client went away, or its chunked encoding was
    malformed (Granian reports both as a disconnect). A 400 if anyone is still listening."""

    def __init__(self) -> None:
        super().__init__(
            400,
            "request body incomplete: the connection closed before its end, or its chunked "
            "encoding is malformed",
        )


class BodySizeLimit:
    """413 for bodies over `limit` bytes (by Content-Length up front, else while streaming); 408
    when the client pauses longer than `timeout` seconds, or has not sent the whole body within
    `total` seconds; 503 while the worker holds `budget` bytes of bodies; 400 for a body that
    ends early. Bodies over `TRIM_BYTES` hand their memory back to the OS once answered."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int = MAX_BODY_BYTES,
        timeout: float = ServeConfig.body_timeout_s,
        total: float = ServeConfig.request_timeout_s,
        budget: BodyBudget | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout
        self.total = total
        self.budget = budget or BodyBudget(ServeConfig.max_concurrency * limit)
        self.trimming = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _send_json(send, 413, f"request body over {self.limit:,} bytes")
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total
        seen = 0
        taken = 0
        complete = False

        async def limited() -> Message:
            nonlocal seen, taken, complete
            if complete:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.timeout, left)))
            except TimeoutError:
                # Raised inside the endpoint's body parsing; FastAPI answers it.
                if left <= self.timeout:
                    reason = f"not complete within {self.total:g} s"
                else:
                    reason = f"no data for {self.timeout:g} s"
                raise HTTPException(408, f"request body not received: {reason}") from None
            if message["type"] == "http.disconnect":
                complete = True
                raise BodyIncomplete()
            size = len(message.get("body", b""))
            seen += size
            complete = not message.get("more_body", False)
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit:,} bytes")
            if not self.budget.take(size):
                raise HTTPException(
                    503, "server busy: too many request bodies at once", {"Retry-After": "1"}
                )
            taken += size
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            self.budget.give(taken)
            if taken > TRIM_BYTES and not self.trimming:
                self.trimming = True
                loop.run_in_executor(None, self._trim)

    def _trim(self) -> None:
        # A large JSON body became millions of small objects; freed, they leave holes in the
        # heaps of the threads that parsed it, which glibc keeps unless asked (docs/serving.md).
        self.trimming = False
        trim_freed_memory()


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}, status_code=status).body
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _top_k(scores: np.ndarray[Any, Any], k: int, names: Sequence[str]) -> list[list[Ranked]]:
    k = max(1, min(k, scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [
        [Ranked(names[int(i)], int(i), float(row[i])) for i in top]
        for row, top in zip(scores, order, strict=True)
    ]


def _as_response(
    ranked: list[list[Ranked]], ood_scores: Sequence[float], threshold: float
) -> PredictResponse:
    return PredictResponse(
        predictions=[
            ImagePrediction(
                prediction=top[0].label,
                verdict=verdict(top[0].probability, float(score), threshold),
                ood_score=round(float(score), 4),
                top=[
                    Candidate.model_validate(
                        {"class": r.label, "index": r.index, "probability": r.probability}
                    )
                    for r in top
                ],
            )
            for top, score in zip(ranked, ood_scores, strict=True)
        ]
    )


class SecurityHeaders:
    """The headers every response carries: no MIME sniffing, no framing, a strict CSP."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, with_headers)


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
    PATHS = ("/", "/predict", "/health", "/livez", "/readyz", "/model", "/metrics")

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
                    await _send_json(send, 500, "internal error")
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


class HeadAsGet:
    """HEAD answered as the GET of the same path would be, without the body (RFC 9110: a
    server that answers GET answers HEAD)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class OneHostHeader:
    """400 for a request with several Host (or Content-Length) headers: which one counts
    differs between proxies and servers, so the host check could be passed with one and the
    request routed by the other."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = [name for name, _ in scope.get("headers", [])]
            for header in (b"host", b"content-length"):
                if names.count(header) > 1:
                    await _send_json(send, 400, f"more than one {header.decode()} header")
                    return
        await self.app(scope, receive, send)


def make_scorer(loaded: LoadedModel, config: ServeConfig) -> tuple[str, Scorer]:
    """The engine that answers batches: ONNX Runtime when installed (engine auto or onnx), else
    the folded PyTorch model; its name is shown by /model."""
    if config.engine in ("auto", "onnx"):
        try:
            return "onnxruntime", onnx_scorer(
                loaded.scored(), mean=loaded.mean, std=loaded.std, threads=config.threads
            )
        except ImportError:
            if config.engine == "onnx":
                raise
    return "torch", torch_scorer(loaded.scored(), mean=loaded.mean, std=loaded.std)


def create_app(checkpoint: Path, config: ServeConfig | None = None) -> FastAPI:
    """The app with its model loaded and warmed, answering in micro-batches.

    Only requests whose Host header names a localhost name or one of `config.allowed_hosts` are
    answered (400 otherwise), so a web page elsewhere cannot reach a local server through DNS
    rebinding.
    """
    config = config or ServeConfig()
    loaded = load_model(checkpoint)
    torch.set_num_threads(config.threads)
    engine, scorer = make_scorer(loaded, config)
    # The first calls build the kernels: done here, so readiness means a fast first answer.
    for n in sorted({1, config.max_batch}):
        scorer(np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8))
    metrics = Metrics()
    batcher = MicroBatcher(
        scorer,
        max_batch=config.max_batch,
        max_delay_s=config.max_delay_ms / 1000.0,
        observe=metrics.batch.observe,
    )
    # Image work runs on this pool, in arrival order (a semaphore over a larger pool woke its
    # waiters in no particular order, and a few requests waited far longer than the rest).
    image_pool = ThreadPoolExecutor(image_threads(config.workers), thread_name_prefix="image")
    # Requests past this many wait here once their bodies are read (which BodySizeLimit bounds
    # in time and, with the body budget, in memory): a slow upload holds no slot meanwhile.
    admission = asyncio.Semaphore(config.max_concurrency)
    budget = BodyBudget(config.max_concurrency * MAX_BODY_BYTES)
    class_names = list(loaded.class_names)
    threshold = loaded.detector.threshold if loaded.detector is not None else float("inf")
    test = loaded.state.get("test") or {}
    sha256 = hash_file(checkpoint)
    model_info = {
        "preset": loaded.preset,
        "dataset": loaded.data_config.dataset,
        "class_names": class_names,
        "preprocess": loaded.data_config.preparation,
        # Shipped models carry their metadata (recipe, command, accuracy); None otherwise.
        "pretrained": loaded.state.get("pretrained"),
        "test_accuracy": test.get("accuracy"),
        "test_loss": test.get("loss"),
        # The file's name and hash identify the model; its folder is none of a client's business.
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256,
        "recipe": {
            "model": loaded.state["config"].get("model"),
            "train": loaded.state["config"].get("train"),
        },
        "data_hashes": loaded.state.get("data_hashes", {}),
        "normalization": {"mean": loaded.mean, "std": loaded.std},
        "calibration": loaded.calibration.as_dict(),
        # null: no detector fitted (`mnist-resnet calibrate` fits one), nothing is flagged
        "ood_threshold": None if loaded.detector is None else threshold,
        "engine": engine,
        "batching": {"max_batch": config.max_batch, "max_delay_ms": config.max_delay_ms},
        "max_body_bytes": MAX_BODY_BYTES,
        "max_batch": MAX_BATCH,
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(batcher.close)
        image_pool.shutdown(wait=False)

    app = FastAPI(
        title="mnist-resnet",
        summary="Handwritten digit classifier (ResNet on MNIST)",
        version=str(loaded.state.get("format_version", "1")),
        # Swagger UI / ReDoc load their scripts from a CDN; the schema itself stays offline.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(
        BodySizeLimit,
        limit=MAX_BODY_BYTES,
        timeout=config.body_timeout_s,
        total=config.request_timeout_s,
        budget=budget,
    )
    app.add_middleware(HeadAsGet)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[*LOCAL_HOSTS, *config.allowed_hosts])
    app.add_middleware(OneHostHeader)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(MeasureRequests, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    # Kubernetes-style probes: alive while the process answers; ready once the model is loaded
    # and warmed, which create_app has done before the server accepts a connection.
    @app.get("/livez")
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready", "checkpoint_sha256": str(model_info["checkpoint_sha256"])}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return model_info

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_by_alias=True,
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                }
                            },
                            "required": ["file"],
                        }
                    },
                    "application/json": {"schema": PixelBatch.model_json_schema()},
                },
                "required": True,
            }
        },
    )
    async def predict(request: Request, response: Response) -> PredictResponse:
        """Top-k classes for uploaded images (multipart field `file`, repeatable; any format,
        size and polarity, preprocessed MNIST-style) or a JSON body `{"images": [28x28, ...]}`.
        """
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            raise HTTPException(
                415, "send multipart/form-data with image file(s) in field 'file', or JSON"
            )
        reader = _json_batch if kind == "application/json" else _upload_batch

        async def answer() -> PredictResponse:
            async with admission:  # released once the body is down to 28x28 images
                batch, k = await reader(request, loaded.data_config.preparation, image_pool)
            scores = await batcher.submit(batch)
            # The scorer's last column is the out-of-distribution score (inference.Scorer).
            ranked = _top_k(scores[:, :-1], k, class_names)
            return _as_response(ranked, scores[:, -1].tolist(), threshold)

        response.headers["X-Model-SHA256"] = sha256
        # The whole body first, before admission: a slow upload then holds no admission slot
        # (BodySizeLimit bounds its time: --body-timeout per pause, --request-timeout in all).
        await request.body()
        try:
            return await asyncio.wait_for(answer(), config.request_timeout_s)
        except TimeoutError:
            raise HTTPException(
                503, f"not answered within {config.request_timeout_s:g} s"
            ) from None
        except BatcherClosed as e:
            raise HTTPException(503, str(e)) from None

    return app


async def _in_thread(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def _json_batch(
    request: Request, mode: str, pool: ThreadPoolExecutor
) -> tuple[np.ndarray[Any, Any], int]:
    raw = await request.body()
    try:
        # A large body becomes millions of Python floats while parsed (about 30 bytes per
        # character): those are parsed on the image pool, a few at a time, not all at once.
        if len(raw) > LARGE_JSON_BYTES:
            body = await _in_thread(pool, PixelBatch.model_validate_json, raw)
        else:
            body = PixelBatch.model_validate_json(raw)
    except ValueError as e:
        first = str(e).strip().splitlines()
        raise HTTPException(422, f"invalid JSON body: {' '.join(first[:3])[:300]}") from None
    if len(body.images) > MAX_BATCH:
        raise HTTPException(422, f"at most {MAX_BATCH} images per request")
    images = []
    for i, image in enumerate(body.images):
        rows = {len(row) for row in image}
        if len(rows) > 1:
            raise HTTPException(422, f"image {i}: rows of different lengths {sorted(rows)[:4]}")
        arr = np.asarray(image, dtype=np.float32)
        if arr.shape != (IMAGE_SIZE, IMAGE_SIZE) and not body.preprocess:
            raise HTTPException(
                422, f"image {i}: expected 28x28 pixels, got {arr.shape}; or set preprocess"
            )
        if arr.ndim != 2 or arr.size == 0 or arr.size > 1024 * 1024:
            raise HTTPException(422, f"image {i}: expected a 2-D array, got shape {arr.shape}")
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
            raise HTTPException(422, f"image {i}: pixel values must be numbers in 0..255")
        if body.preprocess:
            try:
                images.append(await _in_thread(pool, preprocess_pixels, arr, mode))
            except ImageError as e:
                raise HTTPException(422, f"image {i}: {e}") from None
        else:
            images.append(np.round(arr).astype(np.uint8))
    return np.stack(images), body.top_k


async def _upload_batch(
    request: Request, mode: str, pool: ThreadPoolExecutor
) -> tuple[np.ndarray[Any, Any], int]:
    try:
        form = await request.form(max_files=MAX_BATCH, max_fields=MAX_BATCH + 4)
    except HTTPException:
        raise
    except Exception as e:
        raise HTTPException(400, f"malformed multipart body: {e}") from None
    uploads = [v for v in form.getlist("file") if isinstance(v, UploadFile)]
    if not uploads:
        raise HTTPException(422, "no image: send the image(s) in multipart field 'file'")
    k_field = form.get("top_k", str(TOP_K))
    # isdecimal accepts only 0-9 in any script, which int() reads; isdigit would let "²" by.
    # Two digits at most: int() of a 5,000-digit string raises (Python's conversion limit).
    k_text = k_field if isinstance(k_field, str) and len(k_field) <= 2 else ""
    if not (k_text.isascii() and k_text.isdecimal() and 1 <= int(k_text) <= 10):
        raise HTTPException(422, "top_k must be an integer from 1 to 10")
    names = [printable(u.filename or f"file {i}")[:100] for i, u in enumerate(uploads)]
    # Every header first (format, size): what decoding them all would cost is known, and
    # refused, before any pixel is decoded.
    opened = await _in_thread(pool, _open_uploads, [u.file for u in uploads], names)
    images = []
    for name, img in zip(names, opened, strict=True):
        try:
            images.append(await _in_thread(pool, _decode_and_preprocess, img, mode))
        except BlankImage as e:
            raise HTTPException(422, f"{name}: {e}") from None
        except ImageError as e:
            raise HTTPException(400, f"{name}: {e}") from None
    return np.stack(images), int(k_text)


def _open_uploads(uploads: list[BinaryIO], names: list[str]) -> list[Image.Image]:
    opened = []
    for upload, name in zip(uploads, names, strict=True):
        upload.seek(0)
        try:
            opened.append(open_image(upload.read(), max_pixels=MAX_UPLOAD_PIXELS))
        except ImageError as e:
            raise HTTPException(400, f"{name}: {e}") from None
    total = sum(img.width * img.height for img in opened)
    if total > MAX_UPLOAD_PIXELS:
        raise HTTPException(
            400,
            f"the {len(opened)} images hold {total:,} pixels together, over the server's "
            f"{MAX_UPLOAD_PIXELS:,}-pixel limit per request: send fewer or smaller images",
        )
    return opened


def _decode_and_preprocess(img: Image.Image, mode: str) -> np.ndarray[Any, Any]:
    return prepare_image(decode_opened(img), mode)


def app_from_environment() -> FastAPI:
    """Granian's factory: each worker process builds the app from the settings `serve` left in
    the environment."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    _exit_with(settings["supervisor"])
    _forget_dead_workers()
    return_freed_memory()  # after a burst of large uploads the memory goes back to the OS
    config = from_dict(ServeConfig, settings["config"])
    app = create_app(Path(settings["checkpoint"]), config)
    # The objects made so far (torch, the model, the app) live as long as the process: frozen,
    # they are no longer scanned by every full garbage collection, which otherwise paused
    # requests for tens of milliseconds under load.
    gc.collect()
    gc.freeze()
    # One line per worker start: after a replacement, the log says when it took over.
    print(f"mnist-resnet: worker {os.getpid()} ready", file=sys.stderr, flush=True)
    return app


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_with(supervisor: int) -> None:
    """Have the kernel kill this worker when its supervisor dies, even by SIGKILL: orphaned
    workers would otherwise keep the port (Linux only). SIGKILL, not SIGTERM: a worker still
    starting may not act on SIGTERM (docs/reliability.md), and a supervisor killed outright
    loses in-flight requests anyway."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _forget_dead_workers() -> None:
    """Drop the in-flight gauges of worker processes that no longer run (a killed worker's
    requests are not in flight any more); their counters stay, so totals never go back."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass


METRICS_PREFIX = "mnist-resnet-metrics-"


def _metrics_folder(parent: Path | None = None) -> str:
    """A new folder for the workers' metric files, named after this (the supervisor's) process;
    the folders of supervisors that no longer run (killed before they could remove theirs) are
    removed first."""
    parent = parent or Path(tempfile.gettempdir())
    for old in parent.glob(f"{METRICS_PREFIX}*-*"):
        pid = old.name[len(METRICS_PREFIX) :].split("-")[0]
        try:
            mine = old.stat().st_uid == os.getuid()
            if mine and pid.isdigit():
                os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another user's process, or gone meanwhile
            pass
    return tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-", dir=parent)


def serve(checkpoint: Path, config: ServeConfig) -> None:
    """Run the app under Granian until interrupted (Ctrl-C or SIGTERM).

    A worker that dies (killed, out of memory) is replaced while the others go on answering;
    the workers stop when the supervisor does, however it ends."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    metrics_dir = _metrics_folder()
    settings = {
        "checkpoint": str(checkpoint.resolve()),
        "config": to_dict(config),
        "supervisor": os.getpid(),
    }
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    os.environ[MULTIPROC_ENV] = metrics_dir
    # Fresh worker processes: a fork of this one (which has used torch, so its OpenMP pool
    # exists) hangs at its first parallel kernel.
    multiprocessing.set_start_method("spawn", force=True)
    server = Server(
        "mnist_resnet.serve:app_from_environment",
        factory=True,
        interface=Interfaces.ASGI,
        address=config.host,
        port=config.port,
        workers=config.workers,
        http=HTTPModes.http1,
        websockets=False,
        # Connections served at once per worker (idle ones too, until the header timeout).
        backpressure=config.max_connections,
        http1_settings=HTTP1Settings(header_read_timeout=round(config.header_timeout_s * 1000)),
        log_level=LogLevels.warning,
        # A dead worker is replaced (Granian gives up if the same one dies again within 5.5 s of
        # its start, rather than crash-looping).
        respawn_failed_workers=True,
    )
    try:
        server.serve()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
