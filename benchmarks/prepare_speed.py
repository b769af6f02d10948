"""Time of image preparation (decode + `images.preprocess`) per picture, on one core.

Three pictures: a 2,000 x 2,000 JPEG page with a 2-px pen digit (the issue's bound: <= 30 ms),
the 200 x 200 PNG that benchmarks/serve_load.py uploads, and the draw page's 280 x 280 canvas.
With `--baseline REV` the images.py (or, before it existed, predict.py) of that git revision
runs beside today's, alternating call by call, so both see the same machine noise.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/prepare_speed.py --baseline ea6dcaf

Prints the median wall and CPU (thread) time of each; CPU time is what a busy machine
disturbs least. Results and the machine are in docs/data.md ("Pen-written digits").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import pen_digits  # noqa: E402
from serve_load import _digit_png  # noqa: E402

from mnist_resnet import images  # noqa: E402


def pictures() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    seven = Image.new("L", (28, 28), 0)  # a 28x28 "7" whose centre line the pen follows
    ImageDraw.Draw(seven).line([(6, 6), (21, 6), (12, 23)], fill=255, width=3)
    rgb, light = pen_digits._page(rng, (2000, 2000), "cream", 0.3, 3.0)
    ink = pen_digits.draw_stroke(pen_digits.centre_line(np.asarray(seven)), 900, 2)
    region = rgb[500:1400, 500:1400]
    region[:] = region * (1 - ink[..., None]) + np.array([24, 44, 150]) * ink[..., None]
    page = Image.fromarray(np.clip(rgb * light[..., None], 0, 255).astype(np.uint8))
    jpeg = io.BytesIO()
    page.save(jpeg, "JPEG", quality=85)
    canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 255))
    ImageDraw.Draw(canvas).line(
        [(80, 50), (200, 50), (140, 140), (115, 240)], fill=(255, 255, 255, 255), width=18
    )
    png = io.BytesIO()
    canvas.save(png, "PNG")
    return {
        "2000x2000 JPEG, 2-px pen": jpeg.getvalue(),
        "200x200 PNG (serve_load)": _digit_png(),
        "280x280 draw-page canvas": png.getvalue(),
    }


def baseline_module(rev: str) -> ModuleType:
    """images.py of `rev` (or predict.py, which held the preparation before), loaded apart."""
    for path in ("src/mnist_resnet/images.py", "src/mnist_resnet/predict.py"):
        shown = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True
        )
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"{rev} has neither images.py nor predict.py")
    folder = Path(tempfile.mkdtemp())
    (folder / "baseline_images.py").write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("baseline_images", folder / "baseline_images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one(module: Any, payload: bytes) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    # A baseline that finds no ink still spent its time.
    with contextlib.suppress(module.ImageError):
        module.preprocess(module.decode(payload))
    return time.perf_counter() - wall, time.thread_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a git revision to time beside today's code")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    modules: dict[str, Any] = {"today": images}
    if args.baseline:
        modules[args.baseline] = baseline_module(args.baseline)
    for name, payload in pictures().items():
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in modules}
        for _ in range(3):
            for m in modules.values():
                one(m, payload)
        for _ in range(args.repeats):
            for key, m in modules.items():
                times[key].append(one(m, payload))
        for key, got in times.items():
            wall = statistics.median(t[0] for t in got) * 1e3
            cpu = statistics.median(t[1] for t in got) * 1e3
            print(f"{name:<28} {key:>8}: median {wall:6.2f} ms wall, {cpu:6.2f} ms CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
