"""From uint8 pixels to logits: the normalisation and the batched forward pass every model user
(evaluate, predict, serve, export, ensemble) shares. Depends on torch alone, not on the data layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from mnist_resnet.config import TrainConfig
from mnist_resnet.images import to_float
from mnist_resnet.precision import make_runtime
from mnist_resnet.runtime import Runtime

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# The outputs of a calibrated graph (`ood.Scored`): logits, softmax(logits / T) and the
# out-of-distribution score (flagged above the threshold in the file's metadata).
SCORED_OUTPUTS = (OUTPUT_NAME, "probabilities", "ood_score")


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images_u8: Tensor,
    *,
    mean: float,
    std: float,
    runtime: Runtime,
    batch_size: int = TrainConfig.test_batch_size,
) -> Tensor:
    """fp32 logits on the CPU for uint8 images (N, 28, 28) or (N, 1, 28, 28), in large eval
    batches. Images already on the runtime's device (training's device-resident splits) are
    standardised there; the logits stay on the device until the last batch, so a GPU runs the
    whole split without waiting for the host in between.
    """
    model.eval()
    if images_u8.ndim == 3:
        images_u8 = images_u8.unsqueeze(1)
    outputs = []
    for start in range(0, len(images_u8), batch_size):
        x = runtime.prepare_input(to_float(images_u8[start : start + batch_size], mean, std))
        with runtime.autocast():
            outputs.append(model(x).float())
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs).cpu()


def write_onnx_graph(
    model: torch.nn.Module, path: Path, outputs: tuple[str, ...] = (OUTPUT_NAME,)
) -> None:
    """The network as ONNX (input `image` (N,1,28,28) float32, output `logits`; a `Scored`
    network with `outputs=SCORED_OUTPUTS` also gives calibrated probabilities and its score)."""
    example = torch.zeros(2, 1, 28, 28)
    # The TorchScript-based exporter: the torch.export-based one needs onnxscript and takes
    # seconds longer for the same graph; this one is fully offline and exact for a CNN.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
            opset_version=OPSET,
            dynamo=False,
        )


# (N, 28, 28) uint8 images → (N, classes + 1): the calibrated class probabilities, then the
# out-of-distribution score in the last column.
Scorer = Callable[[NDArray[np.uint8]], NDArray[np.float32]]


@torch.inference_mode()
def predict_scored(
    scored: nn.Module,
    images_u8: Tensor,
    *,
    mean: float,
    std: float,
    runtime: Runtime,
    batch_size: int = TrainConfig.test_batch_size,
) -> tuple[Tensor, Tensor]:
    """(calibrated probabilities (N, C), out-of-distribution scores (N,)) of a `Scored`
    network, normalised and batched as `predict_logits` does it."""
    scored.eval()
    if images_u8.ndim == 3:
        images_u8 = images_u8.unsqueeze(1)
    probs, scores = [], []
    for start in range(0, len(images_u8), batch_size):
        x = runtime.prepare_input(to_float(images_u8[start : start + batch_size], mean, std))
        with runtime.autocast():
            _, p, s = scored(x)
        probs.append(p.float().cpu())
        scores.append(s.float().cpu())
    if not probs:
        return torch.empty(0, 0), torch.empty(0)
    return torch.cat(probs), torch.cat(scores)


def torch_scorer(scored: nn.Module, *, mean: float, std: float) -> Scorer:
    """Probabilities and score (see `Scorer`) of a `Scored` network, fp32 on the CPU."""
    runtime = make_runtime(accel=False, amp=False, channels_last=False)

    def score(images: NDArray[np.uint8]) -> NDArray[np.float32]:
        batch = torch.from_numpy(np.ascontiguousarray(images))
        probs, scores = predict_scored(
            scored, batch, mean=mean, std=std, runtime=runtime, batch_size=max(1, len(batch))
        )
        return torch.cat([probs, scores.unsqueeze(1)], dim=1).numpy()

    return score


def onnx_scorer(scored: nn.Module, *, mean: float, std: float, threads: int = 1) -> Scorer:
    """The same through ONNX Runtime (ImportError when it is not installed): the model is
    exported to a temporary file and loaded once; small batches run several times faster than
    in eager PyTorch (docs/serving.md)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mnist-resnet-") as folder:
        path = Path(folder) / "model.onnx"
        write_onnx_graph(scored, path, SCORED_OUTPUTS)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # The same arithmetic as to_float, in float32.
    scale, shift = np.float32(1.0 / (255.0 * std)), np.float32(mean / std)

    def score(images: NDArray[np.uint8]) -> NDArray[np.float32]:
        x = images.reshape(len(images), 1, *images.shape[-2:]).astype(np.float32) * scale - shift
        probs, scores = session.run(list(SCORED_OUTPUTS[1:]), {INPUT_NAME: x})
        return np.concatenate([probs, scores[:, None]], axis=1).astype(np.float32)

    return score
