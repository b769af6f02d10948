"""Reading a /predict or /explain request: JSON pixel arrays or image uploads (decoded and
prepared on the image pool, within the pixel budget) into a uint8 batch; and the answers' shapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from mnist_resnet.errors import printable
from mnist_resnet.explain import Explanation, as_record
from mnist_resnet.images import (
    IMAGE_SIZE,
    BlankImage,
    ImageError,
    decode_opened,
    open_image,
    prepare_image,
    preprocess_pixels,
)
from mnist_resnet.ood import VERDICTS, verdict
from mnist_resnet.predict import Ranked

MAX_BATCH = 64

# Images per /explain request: each costs about 0.1 s of a core (integrated gradients of two
# classes at explain.live_steps for the shipped models; docs/serving.md), where /predict's model
# takes a few ms an image: 8 keep a request near a second of CPU.
MAX_EXPLAIN = 8

TOP_K = 3

# Pixels one request may have decoded, all its images together, checked from their headers
# before any is decoded. An upload is decoded at full size before it is reduced (PNG and WebP
# cannot decode smaller), so the server takes far fewer than `predict` does: 4 MP is 16 MB as
# RGBA, and a tiny lossless WebP can claim far more (decoding times: docs/serving.md).
MAX_UPLOAD_PIXELS = 4_000_000

# 64 images of 28x28 as JSON are about 300 KB; bodies beyond this are parsed off the event loop.
LARGE_JSON_BYTES = 512 * 1024

T = TypeVar("T")


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


class Attribution(BaseModel):
    label: str = Field(..., alias="class")
    index: int
    probability: float
    attribution: list[list[float]] = Field(
        ...,
        description="28x28 integrated gradients of the class's logit over the prepared input: "
        "positive pixels speak for the class, negative ones against it",
    )
    completeness_gap: float = Field(
        ..., description="the map's sum minus the logit's change from a blank image"
    )


class ImageExplanation(ImagePrediction):
    image: list[list[int]] = Field(
        ..., description="the prepared 28x28 input the model saw, 0..255, white ink on black"
    )
    steps: int = Field(..., description="integration steps of the attributions")
    attributions: list[Attribution] = Field(
        ..., description="the answer's map, then the runner-up's (explain.explain)"
    )


class ExplainResponse(BaseModel):
    predictions: list[ImageExplanation]


def rank_top_k(scores: np.ndarray[Any, Any], k: int, names: Sequence[str]) -> list[list[Ranked]]:
    k = max(1, min(k, scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [
        [Ranked(names[int(i)], int(i), float(row[i])) for i in top]
        for row, top in zip(scores, order, strict=True)
    ]


def as_response(
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


def as_explained(
    predicted: PredictResponse,
    explained: Sequence[Explanation],
    names: Sequence[str],
    steps: int,
) -> ExplainResponse:
    """The /predict answer of each image, with its prepared input and its maps (in the numbers
    of `mnist-resnet explain --json`)."""
    return ExplainResponse(
        predictions=[
            ImageExplanation(
                prediction=p.prediction,
                top=p.top,
                verdict=p.verdict,
                ood_score=p.ood_score,
                image=e.image.tolist(),
                steps=steps,
                attributions=[
                    Attribution.model_validate(c) for c in as_record(e, names)["classes"]
                ],
            )
            for p, e in zip(predicted.predictions, explained, strict=True)
        ]
    )


async def _in_thread(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def json_batch(
    request: Request, mode: str, pool: ThreadPoolExecutor, max_images: int = MAX_BATCH
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
    if len(body.images) > max_images:
        raise HTTPException(422, f"at most {max_images} images per request")
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


async def upload_batch(
    request: Request, mode: str, pool: ThreadPoolExecutor, max_images: int = MAX_BATCH
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
    if len(uploads) > max_images:
        raise HTTPException(422, f"at most {max_images} images per request")
    k_field = form.get("top_k", str(TOP_K))
    # isdecimal accepts only decimal digits (any script), which int() reads; isdigit lets "²" by.
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
