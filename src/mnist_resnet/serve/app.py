"""The app's wiring: the model loaded and warmed, the micro-batcher, the middlewares, the routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
)
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from mnist_resnet.batching import BatcherClosed, MicroBatcher
from mnist_resnet.checkpoint import load_model
from mnist_resnet.config import ServeConfig
from mnist_resnet.files import hash_file
from mnist_resnet.images import (
    IMAGE_SIZE,
)
from mnist_resnet.serve.metrics import MeasureRequests, Metrics
from mnist_resnet.serve.middleware import (
    LOCAL_HOSTS,
    MAX_BODY_BYTES,
    BodyBudget,
    BodySizeLimit,
    HeadAsGet,
    OneHostHeader,
    SecurityHeaders,
)
from mnist_resnet.serve.parsing import (
    MAX_BATCH,
    MAX_EXPLAIN,
    ExplainResponse,
    PixelBatch,
    PredictResponse,
    as_explained,
    as_response,
    json_batch,
    rank_top_k,
    upload_batch,
)
from mnist_resnet.serve.service import Explainer, image_threads, make_scorer

STATIC_DIR = Path(str(resources.files("mnist_resnet") / "static"))

T = TypeVar("T")
# json_batch or upload_batch: (request, preparation, image pool, most images) -> (batch, top_k)
Reader = Callable[
    [Request, str, ThreadPoolExecutor, int], Awaitable[tuple[np.ndarray[Any, Any], int]]
]

# The request body both image endpoints take, for the schema.
IMAGES_BODY = {
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
}


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
    explainer = Explainer(checkpoint)
    explainer.explain(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.uint8))
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
        "explain": {"max_images": MAX_EXPLAIN, "steps": explainer.steps},
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(batcher.close)
        image_pool.shutdown(wait=False)
        explainer.close()

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

    def reader_for(request: Request) -> Reader:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            raise HTTPException(
                415, "send multipart/form-data with image file(s) in field 'file', or JSON"
            )
        return json_batch if kind == "application/json" else upload_batch

    async def answered(
        request: Request,
        response: Response,
        max_images: int,
        then: Callable[[np.ndarray[Any, Any], int], Awaitable[T]],
    ) -> T:
        """`then(images, top_k)` for the request's images, read and prepared within the limits,
        in time."""
        reader = reader_for(request)
        response.headers["X-Model-SHA256"] = sha256
        # The whole body first, before admission: a slow upload then holds no admission slot
        # (BodySizeLimit bounds its time: --body-timeout per pause, --request-timeout in all).
        await request.body()

        async def answer() -> T:
            async with admission:  # released once the body is down to 28x28 images
                batch, k = await reader(
                    request, loaded.data_config.preparation, image_pool, max_images
                )
            return await then(batch, k)

        try:
            return await asyncio.wait_for(answer(), config.request_timeout_s)
        except TimeoutError:
            raise HTTPException(
                503, f"not answered within {config.request_timeout_s:g} s"
            ) from None
        except BatcherClosed as e:
            raise HTTPException(503, str(e)) from None

    async def predicted(batch: np.ndarray[Any, Any], k: int) -> PredictResponse:
        scores = await batcher.submit(batch)
        # The scorer's last column is the out-of-distribution score (inference.Scorer).
        ranked = rank_top_k(scores[:, :-1], k, class_names)
        return as_response(ranked, scores[:, -1].tolist(), threshold)

    async def explained(batch: np.ndarray[Any, Any], k: int) -> ExplainResponse:
        said, why = await asyncio.gather(predicted(batch, k), explainer.submit(batch))
        return as_explained(said, why, class_names, explainer.steps)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_by_alias=True,
        openapi_extra=IMAGES_BODY,
    )
    async def predict(request: Request, response: Response) -> PredictResponse:
        """Top-k classes for uploaded images (multipart field `file`, repeatable; any format,
        size and polarity, preprocessed MNIST-style) or a JSON body `{"images": [28x28, ...]}`.
        """
        return await answered(request, response, MAX_BATCH, predicted)

    @app.post(
        "/explain",
        response_model=ExplainResponse,
        response_model_by_alias=True,
        openapi_extra=IMAGES_BODY,
    )
    async def explain(request: Request, response: Response) -> ExplainResponse:
        """What /predict answers, and why: for each image (at most `MAX_EXPLAIN`) the prepared
        28x28 input and the integrated-gradients maps of the answer and the runner-up."""
        return await answered(request, response, MAX_EXPLAIN, explained)

    return app
