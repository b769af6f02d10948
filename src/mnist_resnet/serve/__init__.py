"""HTTP API (FastAPI on Granian) and the draw-a-digit page; the model is loaded once per process.

Endpoints: `POST /predict` (image uploads, or JSON 28x28 pixel arrays; batches allowed),
`POST /explain` (the same inputs, at most `MAX_EXPLAIN` images: /predict's answer with the
prepared input and the integrated-gradients maps of the answer and the runner-up),
`GET /health`, `/livez`, `/readyz`, `/model`, `/metrics` (Prometheus), `/openapi.json`, and
`GET /` (the page, assets beside this file, nothing from a CDN). Bodies over `MAX_BODY_BYTES`
get 413, unreadable images 400, unusable content (blank canvas, wrong shape) 422. Each request
costs bounded memory and time: see `MAX_UPLOAD_PIXELS`, `image_threads` and `ServeConfig`'s
timeouts. Requests' images are answered in micro-batches (batching.py).

Granian serves it: its HTTP layer (Rust, hyper) closes connections that do not send their
headers in time, so idle or slow clients cannot hold the server (uvicorn has no such timeout:
docs/serving.md), and it runs several worker processes for several cores.
"""

from mnist_resnet.serve.app import STATIC_DIR, create_app
from mnist_resnet.serve.metrics import MULTIPROC_ENV, Metrics
from mnist_resnet.serve.middleware import (
    LOCAL_HOSTS,
    MAX_BODY_BYTES,
    SECURITY_HEADERS,
    BodyBudget,
    BodySizeLimit,
)
from mnist_resnet.serve.parsing import MAX_BATCH, MAX_EXPLAIN, MAX_UPLOAD_PIXELS, TOP_K
from mnist_resnet.serve.process import (
    METRICS_PREFIX,
    SETTINGS_ENV,
    app_from_environment,
    serve,
    start,
)
from mnist_resnet.serve.service import Explainer, image_threads, make_scorer

__all__ = [
    "LOCAL_HOSTS",
    "MAX_BATCH",
    "MAX_BODY_BYTES",
    "MAX_EXPLAIN",
    "MAX_UPLOAD_PIXELS",
    "METRICS_PREFIX",
    "MULTIPROC_ENV",
    "SECURITY_HEADERS",
    "SETTINGS_ENV",
    "STATIC_DIR",
    "TOP_K",
    "BodyBudget",
    "BodySizeLimit",
    "Explainer",
    "Metrics",
    "app_from_environment",
    "create_app",
    "image_threads",
    "make_scorer",
    "serve",
    "start",
]
