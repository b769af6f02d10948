"""ONNX / TorchScript / safetensors export of a checkpoint, checked against PyTorch on real test
images.

The exported graph takes what the PyTorch model takes: float32 (N, 1, 28, 28), white ink on
black, scaled (x / 255 - mean) / std. It returns the logits, the calibrated probabilities
(softmax of the logits over the checkpoint's temperature) and the out-of-distribution score
(`ood.Scored`). That contract, with the score's cut-off, travels inside the ONNX file as JSON in
the `preprocessing` metadata entry, so a consumer needs nothing but the file. The safetensors
form is the checkpoint itself without pickle (`checkpoint.save_checkpoint`): the plain state
dict, with configs, calibration and detector in its header; `load`, `predict` and `serve` read it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_resnet import data
from mnist_resnet.checkpoint import INFERENCE_KEYS, LoadedModel, load_model, save_checkpoint
from mnist_resnet.config import PREPROCESS_INPUTS
from mnist_resnet.errors import UserError
from mnist_resnet.images import to_float
from mnist_resnet.inference import (
    INPUT_NAME,
    OUTPUT_NAME,
    SCORED_OUTPUTS,
    predict_logits,
    predict_scored,
    write_onnx_graph,
)
from mnist_resnet.precision import make_runtime

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
NAMES = {"onnx": "ONNX Runtime CPU", "torchscript": "TorchScript", "safetensors": "reloaded"}
# fp32 kernels differ between runtimes in summation order only; 1e-4 on logits is far above
# that noise (about 1e-6 here) and far below anything that could flip a prediction.
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 1000

Log = Callable[[str], None]


class ExportError(UserError):
    """Export or its parity check failed; the message says what and how far off."""


@dataclass(frozen=True)
class Timing:
    latency_ms: float  # median of batch-1 calls
    throughput: float  # images/s at batch 1000


@dataclass(frozen=True)
class ExportReport:
    path: Path
    fmt: str
    max_abs_diff: float
    differing: int
    compared: int
    reference: Timing
    exported: Timing

    def lines(self) -> list[str]:
        name = NAMES[self.fmt]
        return [
            f"wrote {self.path}",
            "speed (fp32, CPU, "
            f"{torch.get_num_threads()} threads): batch-1 latency / batch-1000 throughput",
            f"  PyTorch eager     {self.reference.latency_ms:7.3f} ms   "
            f"{self.reference.throughput:9,.0f} images/s",
            f"  {name:<17} {self.exported.latency_ms:7.3f} ms   "
            f"{self.exported.throughput:9,.0f} images/s",
            f"{self.fmt} parity: max |diff| {self.max_abs_diff:.1e}, "
            f"{self.differing} of {self.compared} predictions differ",
        ]


def preprocessing_contract(loaded: LoadedModel) -> dict[str, Any]:
    """What a caller must feed the exported graph, and what the graph was measured at."""
    test = loaded.state.get("test") or {}
    return {
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "shape": ["N", 1, 28, 28],
        "dtype": "float32",
        "layout": "NCHW",
        "ink": "white (255) on black (0)",
        "preprocess": loaded.data_config.preparation,
        "inputs": PREPROCESS_INPUTS[loaded.data_config.preparation],
        "scaling": "(x / 255 - mean) / std",
        "mean": loaded.mean,
        "std": loaded.std,
        "output_kind": "logits (apply softmax for probabilities)",
        "outputs": list(SCORED_OUTPUTS),
        "probabilities": "softmax(logits / T), T = temperature * (top logit - runner-up) ** "
        "margin_power: calibrated (docs/calibration.md)",
        "temperature": loaded.temperature,
        "margin_power": loaded.calibration.margin_power,
        "ood_score": "higher: less like the training images; above ood_threshold: not a class",
        "ood_threshold": None if loaded.detector is None else loaded.detector.threshold,
        "class_names": list(loaded.class_names),
        "dataset": loaded.data_config.dataset,
        "preset": loaded.preset,
        "test_accuracy": test.get("accuracy"),
    }


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the export extra ({e.name} is missing): "
            "pip install 'mnist-resnet[export]'"
        ) from None
    return onnx, onnxruntime


def export_onnx(loaded: LoadedModel, path: Path) -> None:
    onnx, _ = _onnx_modules()
    write_onnx_graph(loaded.scored(), path, SCORED_OUTPUTS)
    proto = onnx.load(str(path))
    metadata = {
        "preprocessing": json.dumps(preprocessing_contract(loaded)),
        "preset": loaded.preset,
        "data_hashes": json.dumps(loaded.state.get("data_hashes", {})),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "mnist-resnet"
    proto.doc_string = f"mnist-resnet {loaded.preset}: input {INPUT_NAME} float32 (N,1,28,28)"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_torchscript(loaded: LoadedModel, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(  # type: ignore[no-untyped-call]
            loaded.scored(), torch.zeros(2, 1, 28, 28)
        )
        extra = {"preprocessing.json": json.dumps(preprocessing_contract(loaded))}
        torch.jit.save(traced, str(path), _extra_files=extra)


def export_safetensors(loaded: LoadedModel, path: Path) -> None:
    """What inference needs of the checkpoint, its calibration and detector included, as one
    safetensors file."""
    state = {key: loaded.state[key] for key in INFERENCE_KEYS if key in loaded.state}
    state["calibration"] = loaded.calibration.as_dict()
    if loaded.detector is not None:
        state["ood"] = loaded.detector.as_dict()
    else:
        state.pop("ood", None)
    save_checkpoint(path, state, safetensors=True)


def onnx_session(path: Path, threads: int | None = None) -> Any:
    _, ort = _onnx_modules()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _runner(
    fmt: str, path: Path, output: int = 0
) -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    """The exported file as a function: float32 batch → its `output`-th output (0: logits)."""
    if fmt == "onnx":
        session = onnx_session(path)
        name = SCORED_OUTPUTS[output]
        return lambda x: np.asarray(session.run([name], {INPUT_NAME: x})[0])
    if fmt == "safetensors":
        module: torch.nn.Module = load_model(path).scored()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    module.eval()

    def run(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        with torch.no_grad():
            out: tuple[torch.Tensor, ...] = module(torch.from_numpy(x))
        return out[output].numpy()

    return run


def time_runner(
    run: Callable[[np.ndarray[Any, Any]], Any], batch: np.ndarray[Any, Any], budget_s: float = 0.5
) -> Timing:
    """Median batch-1 latency over up to `budget_s`, and best-of-2 batch-1000 throughput."""
    single = batch[:1]
    for _ in range(5):
        run(single)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 500 and (time.perf_counter() < deadline or len(samples) < 5):
        start = time.perf_counter()
        run(single)
        samples.append(time.perf_counter() - start)
    run(batch)
    best = min(_timed(run, batch) for _ in range(2))
    return Timing(statistics.median(samples) * 1e3, len(batch) / best)


def _timed(run: Callable[[np.ndarray[Any, Any]], Any], x: np.ndarray[Any, Any]) -> float:
    start = time.perf_counter()
    run(x)
    return time.perf_counter() - start


def default_output(checkpoint: Path, fmt: str) -> Path:
    return checkpoint.with_suffix(SUFFIXES[fmt])


def export(
    checkpoint: Path,
    fmt: str = "onnx",
    *,
    out: Path | None = None,
    data_dir: Path,
    images: int = PARITY_IMAGES,
    timing_budget_s: float = 0.5,
    log: Log = print,
) -> ExportReport:
    """Export, then compare with PyTorch on `images` real test images; raise on any mismatch."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    if fmt == "onnx":
        _onnx_modules()
    loaded = load_model(checkpoint)
    try:
        splits = data.load_data(
            dataclasses.replace(loaded.data_config, data_dir=str(data_dir)), log=log, download=False
        )
    except data.DataError:
        raise ExportError(
            f"the parity check needs the {loaded.data_config.dataset} test images, not found "
            f"under {data_dir}: run `mnist-resnet data fetch --data-dir DIR` or pass --data-dir"
        ) from None
    test_u8 = splits.test_images[:images]
    path = out or default_output(checkpoint, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "onnx":
            export_onnx(loaded, path)
        elif fmt == "safetensors":
            export_safetensors(loaded, path)
        else:
            export_torchscript(loaded, path)
    except ExportError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"{fmt} export of {checkpoint} failed: {first}") from e

    runtime = make_runtime(accel=False, amp=False, channels_last=False)
    reference = predict_logits(
        loaded.model, test_u8, mean=loaded.mean, std=loaded.std, runtime=runtime
    ).numpy()
    batch = to_float(test_u8.unsqueeze(1), loaded.mean, loaded.std).numpy()
    run = _runner(fmt, path)
    exported = run(batch)
    max_diff = float(np.abs(exported - reference).max())
    differing = int((exported.argmax(1) != reference.argmax(1)).sum())
    # The calibrated probabilities and the score, against PyTorch's.
    probs, scores = predict_scored(
        loaded.scored(), test_u8, mean=loaded.mean, std=loaded.std, runtime=runtime
    )
    max_diff = max(
        max_diff,
        float(np.abs(_runner(fmt, path, 1)(batch) - probs.numpy()).max()),
        float(np.abs(_runner(fmt, path, 2)(batch) - scores.numpy()).max()),
    )

    def eager(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        with torch.no_grad():
            out: torch.Tensor = loaded.model(torch.from_numpy(x))
        return out.numpy()

    report = ExportReport(
        path=path,
        fmt=fmt,
        max_abs_diff=max_diff,
        differing=differing,
        compared=len(batch),
        reference=time_runner(eager, batch, timing_budget_s),
        exported=time_runner(run, batch, timing_budget_s),
    )
    if max_diff > PARITY_TOLERANCE or differing:
        raise ExportError(
            f"{fmt} parity check failed for {path}: max |diff| {max_diff:.2e} "
            f"(tolerance {PARITY_TOLERANCE:.0e}), {differing} of {len(batch)} predictions differ"
        )
    return report
