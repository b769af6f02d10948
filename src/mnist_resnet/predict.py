"""Image files → the model → top-k classes (image preparation lives in `images`)."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from mnist_resnet.checkpoint import LoadedModel, load_model
from mnist_resnet.errors import printable
from mnist_resnet.images import (
    IMAGE_SUFFIXES,
    ImageError,
    UnreadableImage,
    load_image,
    prepare_image,
)
from mnist_resnet.inference import predict_scored
from mnist_resnet.ood import verdict
from mnist_resnet.precision import make_runtime
from mnist_resnet.runtime import Runtime

# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Ranked:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Answer:
    """The top-k classes of one image, and whether to trust them (`ood.verdict`)."""

    top: list[Ranked]
    verdict: str
    ood_score: float


class Predictor:
    """A checkpoint loaded once, in fp32 on the CPU, answering batches of 28x28 uint8 images
    with calibrated probabilities (docs/calibration.md)."""

    def __init__(self, loaded: LoadedModel, runtime: Runtime | None = None) -> None:
        self.loaded = loaded
        # fp32 so answers match the exported model and repeat exactly; single images are tiny.
        self.runtime = runtime or make_runtime(accel=False, amp=False, channels_last=False)
        self.model = self.runtime.prepare_model(loaded.model)
        self.scored = loaded.scored()
        self.class_names = loaded.class_names
        # Image files are prepared the way the training images were (own data may use "resize";
        # a Fashion-MNIST model expects product photos prepared as that dataset was).
        self.preprocess = loaded.data_config.preparation

    @classmethod
    def from_checkpoint(cls, path: Path | str) -> Predictor:
        return cls(load_model(path))

    def scores(
        self, images_u8: NDArray[np.uint8] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated probabilities (N, C), out-of-distribution scores (N,))."""
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

    def answers(self, images_u8: NDArray[np.uint8] | torch.Tensor, k: int = 3) -> list[Answer]:
        probs, ood_scores = self.scores(images_u8)
        k = max(1, min(k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        threshold = self.scored.threshold
        return [
            Answer(
                [
                    Ranked(self.class_names[int(i)], int(i), float(p))
                    for p, i in zip(row_p, row_i, strict=True)
                ],
                verdict(row_p[0], score, threshold),
                score,
            )
            for row_p, row_i, score in zip(
                values.tolist(), indices.tolist(), ood_scores.tolist(), strict=True
            )
        ]

    def top_k(self, images_u8: NDArray[np.uint8] | torch.Tensor, k: int = 3) -> list[list[Ranked]]:
        return [answer.top for answer in self.answers(images_u8, k)]


# ----------------------------------------------------------------------------- files


@dataclass
class FileResult:
    source: str
    top: list[Ranked] = field(default_factory=list)
    error: str | None = None
    unreadable: bool = False
    preprocessed: str | None = None
    verdict: str | None = None
    ood_score: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.source}
        if self.error is not None:
            out["error"] = self.error
            out["unreadable"] = self.unreadable
        else:
            out["prediction"] = self.top[0].label
            # "sure", "unsure" (calibrated top probability below ood.UNSURE_BELOW) or
            # "out_of_distribution" (unlike the training images: not a digit)
            out["verdict"] = self.verdict
            out["ood_score"] = None if self.ood_score is None else round(self.ood_score, 4)
            out["top"] = [
                {"class": r.label, "index": r.index, "probability": round(r.probability, 6)}
                for r in self.top
            ]
        if self.preprocessed:
            out["preprocessed"] = self.preprocessed
        return out


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
    predictor: Predictor,
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
            pixels = prepare_image(load_image(path), predictor.preprocess)
        except ImageError as e:
            result.error, result.unreadable = str(e), isinstance(e, UnreadableImage)
            continue
        if save_preprocessed is not None:
            out = save_preprocessed / f"{len(results):04d}-{path.stem}.png"
            Image.fromarray(pixels, mode="L").save(out)
            result.preprocessed = str(out)
        ready.append((result, pixels))
    if ready:
        answers = predictor.answers(np.stack([p for _, p in ready]), k)
        for (result, _), answer in zip(ready, answers, strict=True):
            result.top, result.verdict, result.ood_score = (
                answer.top,
                answer.verdict,
                answer.ood_score,
            )
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
        if r.error is not None:
            lines.append(printable(f"{r.source}: error: {r.error}"))
            continue
        ranked = ", ".join(f"{x.label} {x.probability:.1%}" for x in r.top)
        lines.append(
            printable(f"{r.source}: {r.top[0].label}  ({ranked}){SAID.get(r.verdict or '', '')}")
        )
    ok = sum(r.error is None for r in results)
    lines.append(f"predicted {ok} of {len(results)} inputs")
    return "\n".join(lines)


def ascii_digit(pixels: NDArray[np.uint8]) -> str:
    """A 28x28 image as text, for eyeballing what the model saw."""
    ramp = " .:-=+*#%@"
    return "\n".join(
        "".join(ramp[min(len(ramp) - 1, int(v) * len(ramp) // 256)] for v in row) for row in pixels
    )
