"""Pen-written digits as people photograph and scan them, made from MNIST *test* digits.

Each digit's centre line (a thinning of the MNIST digit at 8x) is drawn again as a pen stroke of
a chosen width on a page: white, cream, grey or tinted paper of 300-2,000 px, under uneven light,
with paper grain, saved as PNG or JPEG; "photo" pages are also rotated, slightly in perspective
and blurred. Blank pages (tinted, lit, grainy), pages of pure noise and pages with a few specks
of dust are mixed in: those must be answered "blank". Everything is drawn from one seed, so the
set is the same on every machine; nothing of it is committed.

    .venv/bin/python benchmarks/pen_digits.py --out /tmp/pen-set            # make the set
    .venv/bin/python benchmarks/pen_digits.py --out /tmp/pen-set --score     # and score it
    .venv/bin/python benchmarks/pen_digits.py --out /tmp/pen-set --score-only  # score again

Scoring runs `mnist-resnet predict --json` (the path users run) on the set and prints the share
answered right per stroke width, page kind, paper, size and format; the results and the command
are in docs/data.md ("Pen-written digits").
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter

PAPERS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 244),
    "cream": (246, 236, 206),
    "grey": (206, 206, 200),
    "recycled": (226, 220, 204),
    "blue": (222, 232, 246),
}
INKS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 32),
    "blue": (24, 44, 150),
    "pencil": (95, 95, 100),
}
WIDTHS = (1, 2, 3, 4, 5, 6)
BLANK_KINDS = ("blank", "noise", "dust")
SUFFIX = {"jpeg": "jpg", "png": "png"}


@dataclass(frozen=True)
class Page:
    file: str
    label: str  # the digit, or "blank" for pages that hold none
    kind: str  # "scan", "photo", or one of BLANK_KINDS
    width: int  # stroke width in page pixels (0 for blank pages)
    size: int  # the page's longer side
    paper: str
    ink: str
    fmt: str
    test_index: int  # index into MNIST's test set (-1 for blank pages)


# ----------------------------------------------------------------------------- centre lines


def _neighbours(m: NDArray[np.bool_]) -> list[NDArray[np.bool_]]:
    """P2..P9 of Zhang and Suen (1984): N, NE, E, SE, S, SW, W, NW."""
    p = np.pad(m, 1)
    h, w = m.shape
    at = [(0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0), (0, 0)]
    return [p[dy : dy + h, dx : dx + w] for dy, dx in at]


def thin(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Zhang-Suen thinning: a one-pixel centre line with the shape's topology."""
    m = mask.copy()
    while True:
        changed = False
        for step in (0, 1):
            n = _neighbours(m)
            count = sum(x.astype(np.int8) for x in n)
            ring = n + n[:1]
            transitions = sum((~a & b).astype(np.int8) for a, b in itertools.pairwise(ring))
            p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
            if step == 0:
                cut = ~(p2 & p4 & p6) & ~(p4 & p6 & p8)
            else:
                cut = ~(p2 & p4 & p8) & ~(p2 & p6 & p8)
            remove = m & (count >= 2) & (count <= 6) & (transitions == 1) & cut
            if remove.any():
                m &= ~remove
                changed = True
        if not changed:
            return m


def centre_line(digit: NDArray[np.uint8], up: int = 8) -> list[tuple[float, float, float, float]]:
    """Segments (y0, x0, y1, x1) in 28x28 units joining neighbouring centre-line pixels."""
    big = Image.fromarray(digit).resize((28 * up, 28 * up), Image.Resampling.BICUBIC)
    mask = thin(np.asarray(big) > 110)
    ys, xs = np.nonzero(mask)
    on = set(zip(ys.tolist(), xs.tolist(), strict=True))
    segments = []
    for y, x in on:
        for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
            if (y + dy, x + dx) in on:
                segments.append(
                    ((y + 0.5) / up, (x + 0.5) / up, (y + dy + 0.5) / up, (x + dx + 0.5) / up)
                )
    if not segments:  # a dot: one segment of no length still draws the pen's round tip
        segments = [((y + 0.5) / up, (x + 0.5) / up) * 2 for y, x in on]
    return segments


def draw_stroke(
    segments: list[tuple[float, float, float, float]], box: int, width: float
) -> NDArray[np.float32]:
    """The centre line drawn as a round-tipped pen of `width` px, the digit's 28 units over
    `box` px; anti-aliased by drawing at 4x and averaging down. Ink coverage in [0, 1]."""
    ss = 4
    scale = box / 28 * ss
    canvas = Image.new("L", (box * ss, box * ss), 0)
    draw = ImageDraw.Draw(canvas)
    w = max(1, round(width * ss))
    r = w / 2
    for y0, x0, y1, x1 in segments:
        a, b = (x0 * scale, y0 * scale), (x1 * scale, y1 * scale)
        draw.line([a, b], fill=255, width=w)
        for cx, cy in (a, b):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    small = canvas.resize((box, box), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- pages


def _light(rng: np.random.Generator, h: int, w: int, strength: float) -> NDArray[np.float32]:
    """Uneven light: a ramp in a random direction and a vignette, 1.0 at the brightest."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / max(h, w) - 0.5 * h / max(h, w), xx / max(h, w) - 0.5 * w / max(h, w)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = math.cos(angle) * xx + math.sin(angle) * yy
    vignette = xx**2 + yy**2
    field = 1.0 - strength * (rng.uniform(0.4, 1.0) * (ramp + 0.7) + rng.uniform(0, 0.8) * vignette)
    return np.clip(field / field.max(), 0.3, 1.0).astype(np.float32)


def _grain(rng: np.random.Generator, h: int, w: int, amount: float) -> NDArray[np.float32]:
    """Paper grain: pixel noise plus a softer texture, in 0..255 units."""
    fine = rng.normal(0.0, amount, (h, w))
    coarse = rng.normal(0.0, amount, (max(2, h // 6), max(2, w // 6))).astype(np.float32)
    coarse_up = Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return (fine + 0.8 * np.asarray(coarse_up)).astype(np.float32)


def _page(
    rng: np.random.Generator,
    size: tuple[int, int],
    paper: str,
    light: float,
    grain: float,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(RGB paper in 0..255, light field)."""
    w, h = size
    tint = np.array(PAPERS[paper], np.float32)
    field = _light(rng, h, w, light)
    rgb = tint[None, None, :] * np.ones((h, w, 1), np.float32)
    rgb += _grain(rng, h, w, grain)[..., None]
    return rgb, field


def _finish(
    rgb: NDArray[np.float32],
    field: NDArray[np.float32],
    rng: np.random.Generator,
    photo: bool,
    paper: str,
) -> Image.Image:
    img = Image.fromarray(np.clip(rgb * field[..., None], 0, 255).astype(np.uint8), "RGB")
    if photo:
        # A hand-held phone: a small turn, a slight keystone, a little blur, a colour cast.
        w, h = img.size
        fill = tuple(int(c * 0.8) for c in PAPERS[paper])
        img = img.rotate(rng.uniform(-8, 8), Image.Resampling.BICUBIC, fillcolor=fill)
        k = rng.uniform(0.0, 0.06)
        quad = (
            rng.uniform(0, k) * w,
            rng.uniform(0, k) * h,
            rng.uniform(0, k) * w,
            h - rng.uniform(0, k) * h,
            w - rng.uniform(0, k) * w,
            h - rng.uniform(0, k) * h,
            w - rng.uniform(0, k) * w,
            rng.uniform(0, k) * h,
        )
        img = img.transform((w, h), Image.Transform.QUAD, quad, Image.Resampling.BICUBIC)
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        cast = np.array([rng.uniform(0.95, 1.05), 1.0, rng.uniform(0.9, 1.05)], np.float32)
        arr = np.asarray(img, dtype=np.float32) * cast
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


def _save(img: Image.Image, path: Path, fmt: str, rng: np.random.Generator) -> None:
    if fmt == "jpeg":
        img.save(path, "JPEG", quality=int(rng.integers(60, 96)))
    else:
        img.save(path, "PNG")


def digit_page(
    digit: NDArray[np.uint8],
    rng: np.random.Generator,
    *,
    width: int,
    kind: str,
    long_side: int | None = None,
    box: int | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """One MNIST digit written with a pen of `width` px on a page, scanned or photographed."""
    long_side = long_side or int(rng.integers(300, 2001))
    aspect = rng.uniform(0.7, 1.0)
    size = (long_side, max(200, round(long_side * aspect)))
    if rng.random() < 0.5:
        size = (size[1], size[0])
    paper = str(rng.choice(list(PAPERS)))
    ink = str(rng.choice(list(INKS)))
    light = rng.uniform(0.0, 0.45 if kind == "photo" else 0.2)
    grain = rng.uniform(1.0, 6.0 if kind == "photo" else 4.0)
    rgb, field = _page(rng, size, paper, light, grain)
    # People write a digit at a size of their own: a quarter to two thirds of the page.
    box = min(box or max(40, round(min(size) * rng.uniform(0.25, 0.65))), min(size))
    coverage = draw_stroke(centre_line(digit), box, width)
    coverage *= rng.uniform(0.75, 1.0)  # pen pressure
    top = int(rng.integers(0, size[1] - box + 1))
    left = int(rng.integers(0, size[0] - box + 1))
    region = rgb[top : top + box, left : left + box]
    colour = np.array(INKS[ink], np.float32)
    region[:] = region * (1 - coverage[..., None]) + colour * coverage[..., None]
    fmt = "jpeg" if rng.random() < 0.6 else "png"
    img = _finish(rgb, field, rng, kind == "photo", paper)
    meta = {"size": long_side, "paper": paper, "ink": ink, "fmt": fmt}
    return img, meta


def marker_page(
    digit: NDArray[np.uint8], rng: np.random.Generator
) -> tuple[Image.Image, dict[str, Any]]:
    """A thick felt-tip digit, photographed (the kind that read right before pens did)."""
    box_frac = rng.uniform(0.3, 0.65)
    long_side = int(rng.integers(300, 2001))
    box = round(long_side * 0.8 * box_frac)
    width = max(3, round(box * rng.uniform(0.06, 0.12)))
    return digit_page(digit, rng, width=width, kind="photo", long_side=long_side, box=box)


def canvas_page(digit: NDArray[np.uint8], rng: np.random.Generator) -> Image.Image:
    """The draw page's canvas: white ink, an 18-px round pen, on a 280x280 black square."""
    box = int(rng.integers(150, 240))
    coverage = draw_stroke(centre_line(digit), box, 18)
    canvas = np.zeros((280, 280), np.float32)
    top, left = (int(rng.integers(0, 281 - box)) for _ in range(2))
    canvas[top : top + box, left : left + box] = coverage
    return Image.fromarray((canvas * 255).astype(np.uint8), "L").convert("RGBA")


FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")


def fonts() -> list[Path]:
    """Regular (not bold, not italic) TrueType fonts of Debian's DejaVu and Liberation."""
    found = []
    for folder in FONT_DIRS:
        for path in sorted(Path(folder).glob("*.ttf")) if Path(folder).is_dir() else []:
            if not any(k in path.stem for k in ("Bold", "Oblique", "Italic", "ExtraLight")):
                found.append(path)
    return found


def printed_page(
    label: int, font: Path, rng: np.random.Generator
) -> tuple[Image.Image, dict[str, Any]]:
    """A printed digit in `font` on paper, scanned or photographed."""
    from PIL import ImageFont

    long_side = int(rng.integers(300, 2001))
    size = (long_side, max(200, round(long_side * rng.uniform(0.7, 1.0))))
    paper = str(rng.choice(list(PAPERS)))
    rgb, field = _page(rng, size, paper, rng.uniform(0, 0.3), rng.uniform(1, 4))
    height = round(min(size) * rng.uniform(0.25, 0.6))
    face = ImageFont.truetype(str(font), height)
    glyph = Image.new("L", size, 0)
    draw = ImageDraw.Draw(glyph)
    left, top, right, bottom = draw.textbbox((0, 0), str(label), font=face)
    x = rng.uniform(0, max(1, size[0] - (right - left))) - left
    y = rng.uniform(0, max(1, size[1] - (bottom - top))) - top
    draw.text((x, y), str(label), fill=255, font=face)
    coverage = np.asarray(glyph, np.float32)[..., None] / 255.0
    rgb[:] = rgb * (1 - coverage) + np.array(INKS["black"], np.float32) * coverage
    fmt = "jpeg" if rng.random() < 0.6 else "png"
    img = _finish(rgb, field, rng, rng.random() < 0.5, paper)
    return img, {"size": long_side, "paper": paper, "ink": font.stem, "fmt": fmt}


def blank_page(rng: np.random.Generator, kind: str) -> tuple[Image.Image, dict[str, Any]]:
    """A page with no digit: plain (lit, tinted, grainy), pure noise, or a few specks of dust."""
    long_side = int(rng.integers(300, 2001))
    size = (long_side, max(200, round(long_side * rng.uniform(0.7, 1.0))))
    paper = str(rng.choice(list(PAPERS)))
    if kind == "noise":
        w, h = size
        if rng.random() < 0.5:
            arr = rng.integers(0, 256, (h, w), dtype=np.uint8)  # uniform grey noise
        else:
            arr = np.clip(rng.normal(128, 40, (h, w)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L").convert("RGB")
    else:
        rgb, field = _page(rng, size, paper, rng.uniform(0, 0.4), rng.uniform(1, 5))
        if kind == "dust":
            w, h = size
            for _ in range(int(rng.integers(1, 7))):
                r = rng.uniform(0.7, 2.5) * max(1.0, long_side / 600)
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
                yy, xx = np.ogrid[0:h, 0:w]
                speck = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
                rgb[speck] *= rng.uniform(0.3, 0.7)
        img = _finish(rgb, field, rng, rng.random() < 0.5, paper)
    fmt = "jpeg" if rng.random() < 0.6 else "png"
    return img, {"size": long_side, "paper": paper, "ink": "", "fmt": fmt}


def make_set(
    images: NDArray[np.uint8],
    labels: NDArray[np.int64],
    out: Path,
    *,
    per_width: int = 40,
    blanks: int = 10,
    others: int = 0,
    seed: int = 0,
) -> list[Page]:
    """Write the pages and `manifest.json` into `out`: `per_width` scans and as many photos
    for each stroke width, `others` marker photos, draw-page canvases and printed digits (in
    Debian's DejaVu and Liberation fonts, where installed), `blanks` pages of each blank kind."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    pages: list[Page] = []
    picks: Iterator[int] = iter(order.tolist())
    for width in WIDTHS:
        for kind in ("scan", "photo"):
            for _ in range(per_width):
                i = next(picks)
                img, meta = digit_page(images[i], rng, width=width, kind=kind)
                name = f"{len(pages):04d}-{kind}-w{width}-{labels[i]}.{SUFFIX[meta['fmt']]}"
                _save(img, out / name, meta["fmt"], rng)
                pages.append(Page(name, str(int(labels[i])), kind, width, test_index=i, **meta))
    # The kinds that read right before: thick marker photos, the draw page, printed digits.
    for _ in range(others):
        i = next(picks)
        img, meta = marker_page(images[i], rng)
        name = f"{len(pages):04d}-marker-{labels[i]}.{SUFFIX[meta['fmt']]}"
        _save(img, out / name, meta["fmt"], rng)
        pages.append(Page(name, str(int(labels[i])), "marker", 0, test_index=i, **meta))
    for _ in range(others):
        i = next(picks)
        name = f"{len(pages):04d}-canvas-{labels[i]}.png"
        canvas_page(images[i], rng).save(out / name)
        meta = {"size": 280, "paper": "canvas", "ink": "white", "fmt": "png"}
        pages.append(Page(name, str(int(labels[i])), "canvas", 18, test_index=i, **meta))
    faces = fonts()
    for n in range(others if faces else 0):
        label = n % 10
        img, meta = printed_page(label, faces[int(rng.integers(len(faces)))], rng)
        name = f"{len(pages):04d}-printed-{label}.{SUFFIX[meta['fmt']]}"
        _save(img, out / name, meta["fmt"], rng)
        pages.append(Page(name, str(label), "printed", 0, test_index=-1, **meta))
    for kind in BLANK_KINDS:
        for _ in range(blanks):
            img, meta = blank_page(rng, kind)
            name = f"{len(pages):04d}-{kind}.{SUFFIX[meta['fmt']]}"
            _save(img, out / name, meta["fmt"], rng)
            pages.append(Page(name, "blank", kind, 0, test_index=-1, **meta))
    (out / "manifest.json").write_text(json.dumps([asdict(p) for p in pages], indent=1))
    return pages


# ----------------------------------------------------------------------------- scoring


def score(pages: list[Page], answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Share right per stroke width, kind, paper, size and format; blanks counted apart."""
    groups: dict[str, list[bool]] = defaultdict(list)
    blank_answers: dict[str, int] = defaultdict(int)
    # Digits the detector calls "not a digit" (the answer is still given): per page kind.
    flagged: dict[str, list[bool]] = defaultdict(list)
    for p in pages:
        answer = answers[p.file]
        said_blank = "error" in answer and "blank" in answer["error"]
        if p.label == "blank":
            right = said_blank
        else:
            right = answer.get("prediction") == p.label
            flagged[f"kind {p.kind}"].append(answer.get("verdict") == "out_of_distribution")
            if said_blank:
                blank_answers[f"width {p.width}"] += 1
        size = "300-799" if p.size < 800 else "800-1399" if p.size < 1400 else "1400-2000"
        keys = [f"kind {p.kind}", "all digits" if p.label != "blank" else "all blank pages"]
        if p.kind in ("scan", "photo"):
            keys += [f"width {p.width}", f"paper {p.paper}", f"ink {p.ink}", f"size {size}"]
            keys += [f"format {p.fmt}", "all pen pages"]
        for key in keys:
            groups[key].append(right)
    return {
        "right": {k: [sum(v), len(v)] for k, v in sorted(groups.items())},
        "digits answered blank": dict(blank_answers),
        "digits flagged out_of_distribution": {k: [sum(v), len(v)] for k, v in flagged.items()},
    }


def run_predict(folder: Path, files: list[str], extra: list[str]) -> dict[str, dict[str, Any]]:
    """`mnist-resnet predict --json` on the files, as a user runs it."""
    cmd = [sys.executable, "-m", "mnist_resnet", "predict", *files, "--json", *extra]
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise SystemExit(f"predict failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return {Path(r["file"]).name: r for r in json.loads(done.stdout)}


def _mnist_test(mnist_dir: Path) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    from mnist_resnet.data.idx import read_images, read_labels

    images = read_images(mnist_dir / "t10k-images-idx3-ubyte.gz").numpy()
    labels = read_labels(mnist_dir / "t10k-labels-idx1-ubyte.gz").numpy()
    return images, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    repo = Path(__file__).resolve().parents[1]
    parser.add_argument("--out", type=Path, required=True, help="folder for the pages")
    parser.add_argument(
        "--mnist-dir",
        type=Path,
        default=repo.parent / "shared" / "data" / "mnist",
        help="folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz",
    )
    parser.add_argument("--per-width", type=int, default=40)
    parser.add_argument("--blanks", type=int, default=20)
    parser.add_argument("--others", type=int, default=40, help="marker, canvas, printed pages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", action="store_true", help="run predict and score the set")
    parser.add_argument(
        "--score-only", action="store_true", help="score the set already in --out, make nothing"
    )
    parser.add_argument("--results", type=Path, help="write the scores here (JSON)")
    parser.add_argument("predict_args", nargs="*", help="extra predict arguments, after --")
    args = parser.parse_args(argv)
    if args.score_only:
        manifest = json.loads((args.out / "manifest.json").read_text())
        pages = [Page(**p) for p in manifest]
        return _score(args, pages)
    images, labels = _mnist_test(args.mnist_dir)
    pages = make_set(
        images,
        labels,
        args.out,
        per_width=args.per_width,
        blanks=args.blanks,
        others=args.others,
        seed=args.seed,
    )
    print(f"{len(pages)} pages in {args.out}")
    return _score(args, pages) if args.score else 0


def _score(args: argparse.Namespace, pages: list[Page]) -> int:
    answers = run_predict(args.out, [p.file for p in pages], args.predict_args)
    result = score(pages, answers)
    for key, (right, n) in result["right"].items():
        print(f"{key:>22}: {right:4d} / {n:4d} = {right / n:7.2%}")
    print(f"digits answered blank: {result['digits answered blank'] or 'none'}")
    for key, (n_flagged, n) in result["digits flagged out_of_distribution"].items():
        print(f"flagged not a digit, {key}: {n_flagged} of {n}")
    if args.results:
        args.results.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
