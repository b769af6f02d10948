"""What each `--preprocess` mode does to Fashion-MNIST pictures (issue 34): accuracy of the
shipped Fashion-MNIST model on its test images given as the raw 28x28 arrays, and as PNG files
prepared by `predict`'s modes: the images themselves saved as 28x28 PNGs, and the same
products as a photo would show them (dark on light, 6-12x larger, on a larger light-grey table
with uneven light and noise, off centre).

    .venv/bin/python benchmarks/fashion_inputs.py --count 2000 [--data-dir DIR]

Prints one line per (pictures, mode) and writes benchmarks/results-fashion-inputs.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mnist_resnet import data, pretrained
from mnist_resnet.config import PREPROCESS_MODES, default_data_dir
from mnist_resnet.images import ImageError, load_image, prepare_image
from mnist_resnet.predict import Predictor
from mnist_resnet.runtime import configure_threads

HERE = Path(__file__).resolve().parent


def as_photo(item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Fashion-MNIST image (bright product on black) as a photo of the product: dark on a
    light table lit unevenly (light grey 215-245 across the picture), 6-12x larger, off centre,
    with sensor noise. The table's brightness scales the product's, as light on a surface does.
    """
    scale = int(rng.integers(6, 13))
    side = 28 * scale
    big = np.asarray(
        Image.fromarray(item).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32
    )
    canvas = side + int(rng.integers(side // 4, side))
    ys, xs = np.mgrid[0:canvas, 0:canvas] / canvas
    light = 215.0 + 30.0 * (0.5 * ys + 0.5 * xs)  # uneven light: one corner brighter
    top, left = (int(rng.integers(0, canvas - side + 1)) for _ in range(2))
    reflectance = np.ones((canvas, canvas), np.float32)
    reflectance[top : top + side, left : left + side] = 1.0 - np.clip(big, 0, 255) / 255.0
    photo = light * reflectance + rng.normal(0.0, 2.0, (canvas, canvas))
    return np.clip(np.round(photo), 0, 255).astype(np.uint8)


def accuracy(predictor: Predictor, pixels: np.ndarray, labels: np.ndarray) -> float:
    probs = predictor.probabilities(pixels)
    return float((probs.argmax(1).numpy() == labels).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="test images (the first N)")
    parser.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results-fashion-inputs.json")
    given = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(given)
    configure_threads(0)
    predictor = Predictor.from_checkpoint(pretrained.weights_path("fashion-mnist"))
    splits = data.load("fashion-mnist", args.data_dir, log=lambda _: None)
    images = splits.test_images[: args.count].numpy()
    labels = splits.test_labels[: args.count].numpy()
    rng = np.random.default_rng(args.seed)
    rows = [{"pictures": "raw 28x28 arrays", "mode": "none", "accuracy": None, "unusable": 0}]
    rows[0]["accuracy"] = accuracy(predictor, images, labels)
    print(f"raw 28x28 arrays, no preparation: {rows[0]['accuracy']:.2%}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fashion-inputs-") as tmp:
        folders = {"28x28 PNGs": Path(tmp, "png28"), "product photos": Path(tmp, "photos")}
        for folder in folders.values():
            folder.mkdir()
        for i, item in enumerate(images):
            Image.fromarray(item).save(folders["28x28 PNGs"] / f"{i:05d}.png")
            Image.fromarray(as_photo(item, rng)).save(folders["product photos"] / f"{i:05d}.png")
        for kind, folder in folders.items():
            files = sorted(folder.iterdir())
            for mode in PREPROCESS_MODES:
                start = time.perf_counter()
                prepared, unusable = [], 0
                for path in files:
                    try:
                        prepared.append(prepare_image(load_image(path), mode))
                    except ImageError:
                        unusable += 1
                        prepared.append(np.zeros((28, 28), np.uint8))  # counts as wrong
                ms = 1e3 * (time.perf_counter() - start) / len(files)
                score = accuracy(predictor, np.stack(prepared), labels)
                row = {"pictures": kind, "mode": mode, "accuracy": score, "unusable": unusable}
                rows.append({**row, "ms_per_image": round(ms, 2)})
                print(f"{kind}, --preprocess {mode}: {score:.2%} ({unusable} unusable, "
                      f"{ms:.1f} ms an image)", flush=True)  # fmt: skip
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "model": pretrained.describe("fashion-mnist"),
        "images": f"the first {args.count} Fashion-MNIST test images",
        "command": " ".join(["benchmarks/fashion_inputs.py", *given]),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
