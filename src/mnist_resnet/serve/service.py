"""The model service: the engine that answers batches (ONNX Runtime or the folded PyTorch model)
and how many images each worker prepares at once.
"""

from __future__ import annotations

from mnist_resnet.checkpoint import LoadedModel
from mnist_resnet.config import ServeConfig
from mnist_resnet.inference import Scorer, onnx_scorer, torch_scorer
from mnist_resnet.runtime import available_cpus


def image_threads(workers: int) -> int:
    """Images decoded and prepared at once per worker process: the cores shared out between the
    workers, at least one. Bounds memory at about this many full-size decodes per worker, and
    with more threads than cores they only fight over the GIL: on 2 cores with 2 workers, two
    image threads each gave a PNG p99 of 382 ms, one each 258 ms (docs/serving.md)."""
    return max(1, available_cpus() // max(1, workers))


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
