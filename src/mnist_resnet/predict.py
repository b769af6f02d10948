"""The Python API and `mnist-resnet predict`: pictures → the model → classes with calibrated
probabilities (image preparation lives in `images`).

    clf = mnist_resnet.load("mnist")      # a shipped model's name, or a checkpoint file
    answer = clf.predict("digit.png")      # or a PIL image, a numpy array, a uint8 tensor

`Classifier.predict` is what the `predict` command runs for every file it reads.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, overload

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from mnist_resnet.checkpoint import CHECKPOINT_SUFFIXES, CheckpointError, LoadedModel, load_model
from mnist_resnet.config import ConfigError, PredictConfig
from mnist_resnet.errors import printable
from mnist_resnet.files import writable_folder
from mnist_resnet.images import (
    IMAGE_SIZE,
    IMAGE_SUFFIXES,
    ImageError,
    UnreadableImage,
    decode_opened,
    load_image,
    prepare_image,
)
from mnist_resnet.inference import predict_scored
from mnist_resnet.ood import verdict
from mnist_resnet.precision import make_runtime
from mnist_resnet.runtime import Runtime

# One picture: a file path, a PIL image, a uint8 numpy array (H, W) or (H, W, 3 or 4), or a uint8
# tensor (H, W) or (C, H, W) with C = 1, 3 or 4 (torchvision's layout).
ImageInput: TypeAlias = str | os.PathLike[str] | Image.Image | NDArray[Any] | torch.Tensor

# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Ranked:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The answer for one image: what `mnist-resnet predict --json` prints for it, and every
    class's calibrated probability (docs/calibration.md)."""

    index: int  # the most probable class
    label: str  # its name
    probability: float  # its calibrated probability
    probabilities: tuple[float, ...]  # every class's, in class order (sum 1)
    top: tuple[Ranked, ...]  # the k most probable, best first
    # "sure"; "unsure" (top probability below ood.UNSURE_BELOW); or "out_of_distribution"
    # (unlike the training images: probably none of the classes), as `ood.verdict` decides.
    verdict: str
    ood_score: float  # higher: less like the training images

    def as_dict(self) -> dict[str, Any]:
        return {
            "prediction": self.label,
            "verdict": self.verdict,
            "ood_score": round(self.ood_score, 4),
            "top": [
                {"class": r.label, "index": r.index, "probability": round(r.probability, 6)}
                for r in self.top
            ],
        }


class Classifier:
    """A model loaded once, answering pictures with calibrated probabilities (fp32; on the CPU
    unless `load(..., device=...)` says otherwise).

    `model` is the network (`nn.Module`, batch norms folded, eval mode): it takes float32
    (N, 1, 28, 28) images scaled as `(x / 255 - mean) / std` and returns logits.
    """

    def __init__(self, loaded: LoadedModel, runtime: Runtime | None = None) -> None:
        self.loaded = loaded
        # fp32 so answers match the exported model and repeat exactly; single images are tiny.
        self.runtime = runtime or make_runtime(accel=False, amp=False, channels_last=False)
        self.model = self.runtime.prepare_model(loaded.model)
        self.scored = loaded.scored().to(self.runtime.device)
        self.class_names = loaded.class_names
        # Pictures are prepared the way the training images were (own data may use "resize";
        # a Fashion-MNIST model expects product photos prepared as that dataset was).
        self.preprocess = loaded.data_config.preparation

    @classmethod
    def from_checkpoint(cls, path: Path | str) -> Classifier:
        return cls(load_model(path))

    def prepare(self, image: ImageInput) -> NDArray[np.uint8]:
        """One picture as the model's 28x28 uint8 input (white on black), prepared as this
        model's training images were (`DataConfig.preparation`); `ImageError` if it cannot be."""
        return prepare_image(_picture(image), self.preprocess)

    @overload
    def predict(
        self, images: ImageInput, *, k: int = ..., preprocess: bool = ...
    ) -> Prediction: ...
    @overload
    def predict(
        self,
        images: list[ImageInput] | tuple[ImageInput, ...],
        *,
        k: int = ...,
        preprocess: bool = ...,
    ) -> list[Prediction]: ...
    def predict(
        self,
        images: ImageInput | list[ImageInput] | tuple[ImageInput, ...],
        *,
        k: int = 3,
        preprocess: bool = True,
    ) -> Prediction | list[Prediction]:
        """One picture → one `Prediction`; a list or tuple of them → a list, in order.

        `preprocess=False` takes each picture as a finished 28x28 model input (as the
        dataset's own images are: white on black, centred), unchanged. `top` holds the `k`
        most probable classes.
        """
        batch = list(images) if isinstance(images, list | tuple) else [images]
        single = not isinstance(images, list | tuple)
        prepare = self.prepare if preprocess else _as_input
        answers = self.answers(np.stack([prepare(image) for image in batch]), k) if batch else []
        return answers[0] if single else answers

    def scores(
        self, images_u8: NDArray[np.uint8] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated probabilities (N, C), out-of-distribution scores (N,)) of 28x28 inputs."""
        images = torch.as_tensor(np.asarray(images_u8, dtype=np.uint8))
        if images.ndim == 2:
            images = images.unsqueeze(0)
        return predict_scored(
            self.scored,
            images,
            mean=self.loaded.mean,
            std=self.loaded.std,
            runtime=self.runtime,
            batch_size=256,
        )

    def probabilities(self, images_u8: NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
        return self.scores(images_u8)[0]

    def answers(self, images_u8: NDArray[np.uint8] | torch.Tensor, k: int = 3) -> list[Prediction]:
        """A `Prediction` for each of a batch of 28x28 inputs (N, 28, 28)."""
        probs, ood_scores = self.scores(images_u8)
        k = max(1, min(k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        threshold = self.scored.threshold
        answers = []
        for row, row_p, row_i, score in zip(
            probs.tolist(), values.tolist(), indices.tolist(), ood_scores.tolist(), strict=True
        ):
            top = tuple(
                Ranked(self.class_names[int(i)], int(i), float(p))
                for p, i in zip(row_p, row_i, strict=True)
            )
            answers.append(
                Prediction(
                    index=top[0].index,
                    label=top[0].label,
                    probability=top[0].probability,
                    probabilities=tuple(row),
                    top=top,
                    verdict=verdict(top[0].probability, score, threshold),
                    ood_score=score,
                )
            )
        return answers


def load(
    model: str | os.PathLike[str] = "mnist", *, device: str | torch.device = "cpu"
) -> Classifier:
    """A shipped model by name (`mnist`, `fashion-mnist`) or a checkpoint file (`.pt` or
    `.safetensors`), checked as every checkpoint is (`checkpoint.load_model`), ready to predict
    in fp32 on `device`."""
    from mnist_resnet.pretrained import NAMES, weights_path

    if isinstance(model, str) and model in NAMES:
        path = weights_path(model)
    else:
        path = Path(model)
        if not path.exists():
            raise CheckpointError(
                f"no shipped model or file named {str(model)!r}: give "
                f"{' or '.join(NAMES)}, or a checkpoint file (.pt or .safetensors)"
            )
    runtime = Runtime(torch.device(device), None, channels_last=False, precision_note="fp32")
    return Classifier(load_model(path), runtime)


def _picture(image: ImageInput) -> Image.Image:
    """Any accepted picture as a decoded PIL image, reduced as a file of it would be."""
    if isinstance(image, str | os.PathLike):
        return load_image(Path(image))
    if isinstance(image, Image.Image):
        return decode_opened(image)
    pixels = _pixel_array(image)
    mode = "L" if pixels.ndim == 2 else {3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    return decode_opened(Image.fromarray(pixels, mode=mode))


def _pixel_array(image: object) -> NDArray[np.uint8]:
    """A uint8 array (H, W) or (H, W, 3 or 4) from a numpy array or a torchvision-style tensor."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise UnreadableImage(f"expected a uint8 tensor (0..255), got {image.dtype}")
        if image.ndim == 3 and image.shape[0] in (1, 3, 4):
            image = image.permute(1, 2, 0)
        array = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(
            f"cannot read a {type(image).__name__} as an image: give a file path, a PIL image, "
            "a uint8 numpy array or a uint8 tensor"
        )
    if array.dtype != np.uint8:
        raise UnreadableImage(f"expected uint8 pixels (0..255), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or not array.size:
        # (N, 28, 28) arrays are how MNIST-style sets are kept: say how to give them.
        batch = " (a batch? give a list of images: predict(list(images)))" if array.ndim > 2 else ""
        raise UnreadableImage(
            f"expected an image of shape (H, W) or (H, W, 3 or 4), got {tuple(array.shape)}{batch}"
        )
    return np.ascontiguousarray(array)


def _as_input(image: ImageInput) -> NDArray[np.uint8]:
    """A finished 28x28 model input, as it is (`predict(..., preprocess=False)`)."""
    if isinstance(image, str | os.PathLike | Image.Image):
        image = np.asarray(_picture(image).convert("L"))
    pixels = _pixel_array(image)
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise UnreadableImage(
            f"without preparation an image must be {IMAGE_SIZE}x{IMAGE_SIZE} gray pixels, "
            f"got {tuple(pixels.shape)}: leave preprocess on"
        )
    return pixels


# ----------------------------------------------------------------------------- files


@dataclass
class FileResult:
    source: str
    prediction: Prediction | None = None
    error: str | None = None
    unreadable: bool = False
    preprocessed: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.source}
        if self.error is not None:
            out["error"] = self.error
            out["unreadable"] = self.unreadable
        elif self.prediction is not None:
            out.update(self.prediction.as_dict())
        if self.preprocessed:
            out["preprocessed"] = self.preprocessed
        return out


def checkpoint_and_images(given: Sequence[str], verb: str) -> tuple[Path | None, list[str]]:
    """An optional checkpoint file first, then the images: (checkpoint or None, images)."""
    inputs = list(given)
    if Path(inputs[0]).suffix.lower() not in CHECKPOINT_SUFFIXES:
        return None, inputs
    checkpoint = Path(inputs.pop(0))
    if not inputs:
        raise ConfigError(f"give the image files to {verb} after {checkpoint}")
    return checkpoint, inputs


def expand_inputs(inputs: Iterable[str]) -> list[tuple[str, Path | None]]:
    """Files, folders (their image files, sorted) and globs → (shown name, path or None)."""
    found: list[tuple[str, Path | None]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            found.extend((str(p), p) for p in files)
            if not files:
                found.append((item, None))
        elif path.exists() or not glob.has_magic(item):
            found.append((item, path))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            found.extend((m, Path(m)) for m in matches if Path(m).is_file())
            if not matches:
                found.append((item, None))
    return found


def predict_files(
    classifier: Classifier,
    inputs: Sequence[str],
    *,
    k: int = 3,
    save_preprocessed: Path | None = None,
) -> list[FileResult]:
    """One result per input file, in order; a bad file is reported and the others still run."""
    results: list[FileResult] = []
    ready: list[tuple[FileResult, NDArray[np.uint8]]] = []
    if save_preprocessed is not None:
        save_preprocessed.mkdir(parents=True, exist_ok=True)
    for shown, path in expand_inputs(inputs):
        result = FileResult(shown)
        results.append(result)
        if path is None:
            result.error, result.unreadable = "no such file, folder or matching image", True
            continue
        try:
            pixels = classifier.prepare(path)
        except ImageError as e:
            result.error, result.unreadable = str(e), isinstance(e, UnreadableImage)
            continue
        if save_preprocessed is not None:
            out = save_preprocessed / f"{len(results):04d}-{path.stem}.png"
            Image.fromarray(pixels, mode="L").save(out)
            result.preprocessed = str(out)
        ready.append((result, pixels))
    # The files prepared one by one (a bad one is reported alone), then answered together.
    answers = classifier.predict([p for _, p in ready], k=k, preprocess=False)
    for (result, _), answer in zip(ready, answers, strict=True):
        result.prediction = answer
    return results


SAID = {
    "sure": "",
    "unsure": "  [not sure]",
    "out_of_distribution": "  [not like the training images: probably not one of the classes]",
}


def format_results(results: Sequence[FileResult], *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps([r.as_dict() for r in results], indent=2)
    lines = []
    # One line per input, whatever its name or the class names hold (newlines, ANSI escapes,
    # undecodable bytes): they are shown escaped.
    for r in results:
        if r.prediction is None:
            lines.append(printable(f"{r.source}: error: {r.error}"))
            continue
        ranked = ", ".join(f"{x.label} {x.probability:.1%}" for x in r.prediction.top)
        said = SAID.get(r.prediction.verdict, "")
        lines.append(printable(f"{r.source}: {r.prediction.label}  ({ranked}){said}"))
    ok = sum(r.error is None for r in results)
    lines.append(f"predicted {ok} of {len(results)} inputs")
    return "\n".join(lines)


def ascii_digit(pixels: NDArray[np.uint8]) -> str:
    """A 28x28 image as text, for eyeballing what the model saw."""
    ramp = " .:-=+*#%@"
    return "\n".join(
        "".join(ramp[min(len(ramp) - 1, int(v) * len(ramp) // 256)] for v in row) for row in pixels
    )


def main(inputs: Sequence[str], cfg: PredictConfig, *, pretrained: str | None = None) -> int:
    """`mnist-resnet predict`: an optional checkpoint (else a shipped model), then pictures →
    their classes, printed. 1 when an input could not be read; a blank image is reported."""
    from mnist_resnet.pretrained import choose

    cfg.validate()
    checkpoint, images = checkpoint_and_images(inputs, "classify")
    if cfg.save_preprocessed is not None:
        writable_folder(cfg.save_preprocessed, "--save-preprocessed")
    classifier = Classifier.from_checkpoint(choose(checkpoint, pretrained).path)
    saved = cfg.save_preprocessed
    results = predict_files(classifier, images, k=cfg.top_k, save_preprocessed=saved)
    print(format_results(results, as_json=cfg.json))
    return 1 if any(r.unreadable for r in results) else 0


# The name before the Python API, still used by tests and benchmarks.
Predictor = Classifier
