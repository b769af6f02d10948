"""The model service: the engine that answers batches (ONNX Runtime or the folded PyTorch model),
how many images each worker prepares at once, and the explainer behind /explain.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from mnist_resnet.checkpoint import LoadedModel, load_model
from mnist_resnet.config import ServeConfig
from mnist_resnet.explain import Explanation, explain, live_steps
from mnist_resnet.inference import Scorer, onnx_scorer, torch_scorer
from mnist_resnet.runtime import Runtime, available_cpus


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


# Images on the integration path per forward and backward pass of /explain. The server maps
# every buffer over 1 MiB for itself (runtime.return_freed_memory), so the activations of all
# the steps at once were mapped, faulted in and unmapped on every pass; batches of 16 stay
# under that and gave the same maps faster (measured in docs/serving.md#what-the-network-looks-at).
PASS_BATCH = 16


class Explainer:
    """Integrated gradients for /explain (`explain.explain`, the function of `mnist-resnet
    explain`, at `explain.live_steps` of the model), one request at a time on a thread of its
    own.

    It runs its own copy of the network: the detector's hooks on the one that answers batches
    (and the stage taps `explain` sets) would otherwise see each other's forward passes. Images
    are explained one by one, so a request's memory is one image's however many it sends.
    """

    def __init__(
        self, checkpoint: Path, steps: int | None = None, batch: int | None = PASS_BATCH
    ) -> None:
        self.loaded = load_model(checkpoint)
        # NHWC: explanations take less time than in the layout it loads in, with the same maps
        # (measured in docs/serving.md#what-the-network-looks-at).
        Runtime(torch.device("cpu"), None, channels_last=True).prepare_model(self.loaded.model)
        self.steps = steps or live_steps(self.loaded)
        self.batch = batch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="explain")

    def explain(self, images: NDArray[np.uint8]) -> list[Explanation]:
        return [
            explain(self.loaded, image, steps=self.steps, maps_per_stage=0, batch=self.batch)[0]
            for image in images
        ]

    async def submit(self, images: NDArray[np.uint8]) -> list[Explanation]:
        """The explanations, computed off the event loop; one still waiting for the thread is
        dropped when the request is cancelled (its timeout)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.explain, images)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
