"""Any picture → the model's 28x28 input: the one home of image preparation.

Used by `predict`, `serve` (and its draw page) and own-data loading, so a picture is prepared
the same way wherever it enters.

MNIST digits are white ink on black, the ink's bounding box scaled to fit 20x20 with its aspect
kept, anti-aliased, then placed in a 28x28 frame so that its centre of mass is the centre
(LeCun et al.). `preprocess` rebuilds exactly that from any picture of a digit:

1. decode the first frame, refusing files over `MAX_FILE_BYTES` and images over `MAX_PIXELS`
   (decompression bombs) before any pixel is decoded;
2. grayscale by luminance, alpha composited on white (a transparent canvas with white ink and
   nothing else falls back to the alpha channel as the ink); 16/32-bit modes scaled to [0, 1];
3. invert when the background (median of the border) is lighter than the ink, so ink is bright;
4. flatten uneven lighting (photos): fit a quadratic surface to the background pixels and
   subtract it, then stretch so the background is 0 and the strongest ink 1;
5. crop to the ink's bounding box (the faintest 0.1% of ink mass on each side is ignored, so a
   speck of dust does not widen the box);
6. thicken strokes thinner than MNIST's (a fine pen on a big photo) and scale the longer side
   to 20 px, keeping the aspect ratio;
7. paste into 28x28 so that the centre of mass lands on the centre;
8. normalise as in training: (x / 255 - mean) / std with the checkpoint's mean and std.

Beside it, `fashion_style` rebuilds Fashion-MNIST's own recipe for photos of products (what a
Fashion-MNIST model expects), and `resize_plain` only resizes; `prepare_image` picks one.

Over 500 lines because it is one pipeline read in the order above, each step a small function
with the measurement that set its constant; the steps share the helpers for ink and background.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

if TYPE_CHECKING:
    from torch import Tensor

IMAGE_SIZE = 28
DIGIT_BOX = 20
# A 48-MP phone photo is 12 MB as JPEG; a 30,000 x 30,000 canvas (900 MP) is a bomb.
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 50_000_000
# Work on at most this many pixels per side: plenty for a digit, and bounds memory and time.
WORK_SIDE = 1024
# Below this contrast between background and ink (on a 0..1 scale) there is no digit to read.
MIN_CONTRAST = 0.08
# On a clean, noiseless page ink is what stands at least this far from the paper (a faint
# 1-px pencil line on a big page, halved by the reduction to the work size, is about 0.06).
INK_FLOOR = 0.04
# The paper's surface and noise are fitted on a grid of at most this many pixels a side.
FIT_SIDE = 64
# Strokes are measured where the ink is above INK_LEVEL of its strength; MNIST's median width
# so measured at 4x its 20-px box is STROKE_4X (docs/data.md, "Pen-written digits").
INK_LEVEL = 0.25
STROKE_4X = 11.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The decoders tried, whatever a file's name says (Pillow's names; its JPEG decoder also reads
# the multi-picture JPEGs of cameras).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
FORMAT_NAMES = "PNG, JPEG, GIF, BMP, TIFF or WebP"

Gray = NDArray[np.float32]


class ImageError(Exception):
    """One input cannot be used; the message says why, in one line."""


class UnreadableImage(ImageError):
    """The bytes are not a decodable image (missing, empty, truncated, foreign, too large)."""


class BlankImage(ImageError):
    """The image decodes but holds no ink to classify."""


# ----------------------------------------------------------------------------- decoding


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A file's bytes, refusing missing, empty and oversized files with a one-line reason."""
    try:
        # Non-blocking open, then a look at what was opened: a FIFO or a device would otherwise
        # block the open (or the read) forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UnreadableImage("not a regular file (a FIFO, socket or device)")
            payload = f.read(limit + 1)
    except FileNotFoundError:
        raise UnreadableImage("no such file") from None
    except IsADirectoryError:
        raise UnreadableImage("is a directory") from None
    except OSError as e:
        raise UnreadableImage(f"cannot read: {e.strerror or e}") from None
    if not payload:
        raise UnreadableImage("empty file (0 bytes)")
    if len(payload) > limit:
        raise UnreadableImage(f"file is larger than {limit // (1024 * 1024)} MB")
    return payload


def open_image(payload: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image's header read and checked, no pixel decoded yet: one of `FORMATS`, at most
    `max_pixels` as it will be decoded (JPEG already set to decode at a reduced scale).

    What the pixels will cost is known here, so a caller can bound the decoding work of several
    images (the server: per request) before any of it is done."""
    if not payload:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only these decoders are tried: Pillow would otherwise identify dozens of formats,
            # EPS among them (which runs Ghostscript), for a picture of a digit.
            img: Image.Image = Image.open(io.BytesIO(payload), formats=FORMATS)
            # JPEG can decode straight at a reduced scale: far faster and smaller for big
            # photos, so the pixel budget applies to what will really be decoded. Asking for
            # half the work side keeps at least 512 px a side (a 2,000-px page decodes at
            # 1,000, not 2,000 reduced afterwards).
            img.draft("RGB", (WORK_SIDE // 2, WORK_SIDE // 2))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise UnreadableImage(f"not an image in a supported format ({FORMAT_NAMES})") from None
    except Exception as e:
        raise UnreadableImage(f"corrupt or truncated image: {_first_line(e)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise UnreadableImage(
            f"image is {width} x {height} pixels, over the {max_pixels:,}-pixel limit "
            "(a decompression bomb or an absurdly large picture)"
        )
    if width < 1 or height < 1:
        raise UnreadableImage(f"image has no pixels ({width} x {height})")
    return img


def decode_opened(img: Image.Image) -> Image.Image:
    """Decode the first frame of an image from `open_image`; every failure is one line."""
    # Decoders of untrusted bytes fail in many ways (OSError, SyntaxError, struct errors, ...);
    # every one of them means "not a usable image", so all are turned into one message.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            return _reduced(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"refused as a decompression bomb: {e}") from None
    except Exception as e:
        raise UnreadableImage(f"corrupt or truncated image: {_first_line(e)}") from None


def decode(payload: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode the first frame of an image, bounded in pixels; every failure is one line."""
    return decode_opened(open_image(payload, max_pixels))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _reduced(img: Image.Image) -> Image.Image:
    """At most WORK_SIDE pixels per side, by an integer box reduction that allocates only the
    small result, so the full-size decode is the only full-size buffer and is freed at once."""
    factor = -(-max(img.size) // WORK_SIDE)
    if factor <= 1:
        return img
    try:
        return img.reduce(factor)
    except ValueError:  # modes reduce() does not handle (e.g. palette): the copying way
        return _shrink(img)


def load_image(path: Path) -> Image.Image:
    return decode(read_bytes(path))


# ----------------------------------------------------------------------------- preprocessing


def _shrink(img: Image.Image) -> Image.Image:
    if max(img.size) <= WORK_SIDE:
        return img
    img = img.copy()
    img.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
    return img


def to_gray(img: Image.Image) -> Gray:
    """Luminance in [0, 1] (float32), alpha composited on white."""
    img = _shrink(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "I" and arr.max() <= 65535:
            top = 65535.0 if arr.max() > 255 else 255.0
        scaled: Gray = np.clip(arr / top, 0.0, 1.0).astype(np.float32)
        return scaled
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if not has_alpha:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    gray = np.asarray(Image.alpha_composite(white, rgba).convert("L"), dtype=np.float32) / 255.0
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    if _contrast(gray) < MIN_CONTRAST <= _contrast(alpha):
        # White (or pale) ink on a transparent canvas vanishes on white: the alpha is the ink.
        return 1.0 - alpha
    return gray


def _contrast(gray: Gray) -> float:
    lo, hi = np.percentile(gray, [1.0, 99.0])
    return float(hi - lo)


def _quadratic_fit(
    values: NDArray[np.float64],
    weights: NDArray[np.float64],
    ys: NDArray[np.float64],
    xs: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Weighted least squares of a quadratic surface in (y, x) over a grid of `values`.

    Solved by the normal equations of the six terms 1, y, x, y^2, x^2, yx, whose sums are
    separable moments (powers of y) @ weights @ (powers of x): nothing of size pixels x terms is
    built (a tall design matrix and its SVD were most of a served request, docs/serving.md).
    """
    y_pow = np.stack([ys**k for k in range(5)])
    x_pow = np.stack([xs**k for k in range(5)])
    moments = y_pow @ weights @ x_pow.T  # moments[a, b] = sum of weight * y^a x^b
    weighted = y_pow[:3] @ (weights * values) @ x_pow[:3].T
    terms = ((0, 0), (1, 0), (0, 1), (2, 0), (0, 2), (1, 1))  # (power of y, power of x)
    gram = np.array([[moments[a + c, b + d] for c, d in terms] for a, b in terms])
    rhs = np.array([weighted[a, b] for a, b in terms])
    try:
        coef: NDArray[np.float64] = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        coef = np.linalg.lstsq(gram, rhs)[0]
    return coef


def _surface(coef: NDArray[np.float64], ys: NDArray[np.float64], xs: NDArray[np.float64]) -> Gray:
    rows = (coef[0] + coef[1] * ys + coef[3] * ys * ys).astype(np.float32)
    cols = (coef[2] * xs + coef[4] * xs * xs).astype(np.float32)
    surface: Gray = rows[:, None] + cols[None, :]
    if coef[5]:
        surface += np.outer(np.float32(coef[5]) * ys.astype(np.float32), xs.astype(np.float32))
    return surface


def background(gray: Gray) -> tuple[Gray, float]:
    """The paper, uneven light included, as a smooth surface; and the noise around it.

    A quadratic surface is fitted to the pixels that are not ink, found by alternating: fit,
    measure the noise (the median absolute deviation of the kept residuals), drop the pixels far
    from the surface on either side, fit again. Ink of any width and either polarity is a
    minority of the pixels far from the surface, so it leaves the fit, and light falling off
    across a page does not. The fit uses a grid of at most FIT_SIDE pixels a side (point
    samples, so the noise measured is the pixels' own). Returns (surface, sigma) in 0..1 units.
    """
    h, w = gray.shape
    step = max(1, -(-max(h, w) // FIT_SIDE))
    ys_full = (np.arange(h, dtype=np.float64) + 0.5) / h - 0.5
    xs_full = (np.arange(w, dtype=np.float64) + 0.5) / w - 0.5
    ys, xs = ys_full[::step], xs_full[::step]
    small = gray[::step, ::step].astype(np.float64)
    # Start from flat paper at the median: a fit over every pixel of a small, tightly framed
    # digit would bend into a bump under the digit and call it paper.
    coef = np.array([float(np.median(small)), 0.0, 0.0, 0.0, 0.0, 0.0])
    weights = np.ones_like(small)
    sigma = 0.0
    for fits in range(4):
        residual = small - _surface(coef, ys, xs)
        kept = residual[weights > 0]
        centre = float(np.median(kept))
        # The median absolute deviation: ink may cover up to half the pixels of a tight crop.
        sigma = 1.4826 * float(np.median(np.abs(kept - centre)))
        within = np.abs(residual - centre) <= max(3.0 * sigma, 0.5 * INK_FLOOR)
        if within.sum() < 12 or (fits and np.array_equal(within, weights > 0)):
            break
        weights = within.astype(np.float64)
        coef = _quadratic_fit(small, weights, ys, xs)
    return _surface(coef, ys_full, xs_full), sigma


def _kth_largest(values: Gray, k: int) -> float:
    flat = values.ravel()
    k = max(1, min(k, flat.size))
    return float(np.partition(flat, flat.size - k)[flat.size - k])


def _border_contact(
    box: tuple[slice, slice], sub: NDArray[np.bool_], shape: tuple[int, ...]
) -> int:
    """How many of a component's pixels (`sub`, the mask within its `box`) lie on the edge."""
    h, w = shape
    ys, xs = box
    touching = 0
    if ys.start == 0:
        touching += int(sub[0].sum())
    if ys.stop == h:
        touching += int(sub[-1].sum())
    if xs.start == 0:
        touching += int(sub[:, 0].sum())
    if xs.stop == w:
        touching += int(sub[:, -1].sum())
    return touching


def _edge_regions(residual: Gray, tail: float, cell: int) -> NDArray[np.bool_]:
    """Pixels beyond `tail` (either side) in regions that run along the image's edge for more
    than 60% of their extent, at least 3% of the page long: a table, the page's edge, a shadow
    in a photo. A stroke that merely reaches the edge touches it over its width only. Found on
    a grid of one pixel per `cell` (such regions are large), then marked at full size."""
    rim = (residual[0], residual[-1], residual[:, 0], residual[:, -1])
    if max(float(np.abs(side).max()) for side in rim) <= tail:
        return np.zeros((0, 0), dtype=bool)  # nothing beyond the tail reaches the edge
    grid = residual[::cell, ::cell]
    along = np.zeros(grid.shape, dtype=bool)
    for side in (grid > tail, grid < -tail):
        groups, _ = ndimage.label(side, structure=np.ones((3, 3)))
        for index, box in enumerate(ndimage.find_objects(groups), start=1):
            if box is None:
                continue
            extent = max(box[0].stop - box[0].start, box[1].stop - box[1].start)
            members = groups[box] == index
            if extent >= 3 and _border_contact(box, members, grid.shape) > 0.6 * extent:
                along[box] |= members
    if not along.any():
        return along[:0, :0]
    h, w = residual.shape
    cells = np.repeat(np.repeat(along, cell, axis=0), cell, axis=1)[:h, :w]
    # Dilated by a cell, so the region's rim between grid points goes with it.
    cells = ndimage.binary_dilation(cells, iterations=cell)
    found: NDArray[np.bool_] = cells & (np.abs(residual) > tail)
    return found


def find_ink(gray: Gray) -> Gray:
    """The digit's ink, bright on 0, in [0, 1]: found at any stroke width and page size.

    1. Subtract the paper (`background`); the ink is the side (darker or lighter than the
       paper) with more mass far from it, so dark pen on paper and white chalk on black both
       come out bright.
    2. Hysteresis thresholds set by the noise and by the ink itself: a pixel well above the
       noise (6 sigma) and a third of the strongest ink seeds a stroke; the stroke grows through
       pixels above 3 sigma. A 1-px line on a 2,000-px page is then ink however few pixels it
       covers, while grain and JPEG noise stay under the seeds' level.
    3. Pieces near each other are grouped (a thin line broken by noise is one stroke). The
       group with the longest extent is the digit; others count only when they are large or
       close to it. Groups that run along the image's edge (a table or the page's edge in a
       photo) are left out. A page whose largest group is a speck is blank, not a guess.
    """
    surface, sigma = background(gray)
    residual = gray - surface
    tail = np.float32(max(4.0 * sigma, 0.5 * INK_FLOOR))
    h, w = residual.shape
    # Pieces of one stroke broken by noise or a faint pen lie within ~1% of the page: grouping
    # on a grid of that cell size joins them (and is far cheaper than growing every piece).
    cell = max(1, round(0.01 * max(h, w)))
    # Regions, lighter or darker than the paper, that run along the image's edge are the
    # table, the page's edge or a shadow in a photo: they decide neither polarity nor strength.
    edges = _edge_regions(residual, float(tail), cell)
    if edges.size:
        residual[edges] = 0.0
    # Polarity from every other pixel of a large page: the mass beyond the tail decides, and a
    # quarter of a stroke's pixels carry the same share of it.
    sample = residual[::2, ::2] if min(h, w) >= 512 else residual
    darker = float(np.maximum(-sample - tail, 0.0).sum())
    lighter = float(np.maximum(sample - tail, 0.0).sum())
    ink = residual
    if darker > lighter:
        np.negative(ink, out=ink)
    np.maximum(ink, 0.0, out=ink)
    # The strength of the ink: one of its strongest pixels, but not the very strongest, so a few
    # hot pixels do not set it (the 50th of a megapixel page, the 3rd of a 28x28 digit).
    strong = ink[ink > tail]
    if strong.size == 0:
        raise BlankImage("blank image: no ink found (uniform canvas)")
    peak = _kth_largest(strong, int(np.clip(ink.size // 20_000, 3, 50)))
    high = max(INK_FLOOR, 6.0 * sigma, 0.35 * peak)
    if peak < high:
        raise BlankImage("blank image: no ink found (uniform canvas)")
    low = max(0.5 * INK_FLOOR, 3.0 * sigma, 0.15 * peak)
    labels, count = ndimage.label(ink > low, structure=np.ones((3, 3)))
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[labels[ink > high]] = True
    seeded[0] = False
    strokes = seeded[labels]
    coarse = _max_pool(strokes, cell) if cell > 1 else strokes
    groups, n_groups = ndimage.label(coarse, structure=np.ones((3, 3)))
    found = []
    for index, box in enumerate(ndimage.find_objects(groups), start=1):
        if box is None:
            continue
        members = groups[box] == index
        # The extent in pixels, from the stroke pixels in the group's cells (the grid alone
        # would make a 5-px speck that straddles cells look several cells long).
        pixels = strokes[box[0].start * cell : box[0].stop * cell, box[1].start * cell :]
        pixels = pixels[:, : (box[1].stop - box[1].start) * cell]
        cells = np.repeat(np.repeat(members, cell, axis=0), cell, axis=1) if cell > 1 else members
        pixels = pixels & cells[: pixels.shape[0], : pixels.shape[1]]
        rows, cols = np.nonzero(pixels.any(axis=1))[0], np.nonzero(pixels.any(axis=0))[0]
        extent = max(int(rows[-1] - rows[0]), int(cols[-1] - cols[0])) + 1
        if cell * _border_contact(box, members, groups.shape) > 0.6 * extent:
            continue  # runs along the edge: the page's or a table's edge, not writing
        found.append((extent, int(members.sum()), index, box))
    if not found:
        raise BlankImage("blank image: no ink found")
    extent, _, main, main_box = max(found)
    if extent < max(5, 0.03 * min(h, w)):
        raise BlankImage("blank image: no ink found (only specks)")
    keep = np.zeros(n_groups + 1, dtype=bool)
    keep[main] = True
    margin = 0.5 * extent / cell
    for other_extent, _, index, box in found:
        near = (
            box[0].stop > main_box[0].start - margin
            and box[0].start < main_box[0].stop + margin
            and box[1].stop > main_box[1].start - margin
            and box[1].start < main_box[1].stop + margin
        )
        if near and other_extent >= 0.1 * extent:
            keep[index] = True
    # Only the kept groups' box is worked on from here: the rest of the page is background.
    kept_cells = keep[groups]
    rows, cols = np.nonzero(kept_cells.any(axis=1))[0], np.nonzero(kept_cells.any(axis=0))[0]
    box = (
        slice(int(rows[0]) * cell, min(h, (int(rows[-1]) + 1) * cell)),
        slice(int(cols[0]) * cell, min(w, (int(cols[-1]) + 1) * cell)),
    )
    kept = kept_cells[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if cell > 1:
        kept = np.repeat(np.repeat(kept, cell, axis=0), cell, axis=1)
    region = ink[box]
    kept = kept[: region.shape[0], : region.shape[1]] & strokes[box]
    scale = np.float32(max(peak - low, 1e-6))
    out: Gray = np.zeros(ink.shape, dtype=np.float32)
    out[box] = np.where(kept, np.clip((region - np.float32(low)) / scale, 0.0, 1.0), 0.0)
    return out


def ink_box(ink: Gray, trim: float = 0.001) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), half-open, of the ink with `trim` of its mass cut per side."""
    total = float(ink.sum())
    if total <= 0:
        raise BlankImage("blank image: no ink found")

    def span(profile: NDArray[np.float32]) -> tuple[int, int]:
        cum = np.cumsum(profile) / total
        first = int(np.searchsorted(cum, trim, side="right"))
        last = int(np.searchsorted(cum, 1.0 - trim, side="left"))
        return first, max(first + 1, min(last + 1, len(profile)))

    top, bottom = span(ink.sum(axis=1))
    left, right = span(ink.sum(axis=0))
    return top, bottom, left, right


def _resize(ink: Gray, size: tuple[int, int]) -> Gray:
    """Area-correct resize of a float image to (width, height)."""
    img = Image.fromarray(ink.astype(np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)


_Pooled = TypeVar("_Pooled", bound=np.generic)


def _max_pool(ink: NDArray[_Pooled], k: int) -> NDArray[_Pooled]:
    """Block maximum: shrinks by `k` and keeps a line thinner than `k` pixels at full strength
    (an average would fade a 1-px line to 1/k)."""
    h, w = ink.shape
    hp, wp = h + (-h % k), w + (-w % k)
    if (hp, wp) == (h, w):
        padded = ink
    else:
        padded = np.zeros((hp, wp), dtype=ink.dtype)
        padded[:h, :w] = ink
    # Rows first, then columns: two reductions over contiguous blocks are several times
    # faster than one over axes (1, 3).
    rows = padded.reshape(hp // k, k, wp).max(axis=1)
    pooled: NDArray[_Pooled] = rows.reshape(hp // k, wp // k, k).max(axis=2)
    return pooled


def stroke_width(ink: Gray, level: float = 0.5) -> float:
    """Mean stroke width in pixels of the ink above `level`: a stroke of width w and length L
    has area wL and an outline of 2L."""
    mask = ink > level
    area = int(np.count_nonzero(mask))
    if not area:
        return 0.0
    # Interior pixels have all four neighbours inked (pixels on the image's edge never do).
    interior = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2]
    interior &= mask[1:-1, 2:]
    outline = max(1, area - int(np.count_nonzero(interior)))
    return 2.0 * area / outline


def fit_digit(ink: Gray) -> Gray:
    """The cropped ink scaled so its longer side is 20 px, strokes at least MNIST-thick.

    The ink is brought to 80-159 px a side (4-8x the final size): a block maximum shrinks a big
    crop without fading a 1-px line, a small crop is enlarged. There its strokes are measured.
    At twice the final size, a stroke thinner than MNIST's (STROKE_4X at 4x), whatever pen and
    page it came from, is widened by drawing a round pen of the missing width along it (a
    distance transform; at 2x it costs a tenth of what it does at 4x and still anti-aliases to
    half a final pixel), so a fine pen and a marker reach the model alike.
    """
    side = 4 * DIGIT_BOX
    h, w = ink.shape
    pool = max(h, w) // side
    if pool >= 2:
        ink = _max_pool(ink, pool)
    elif max(h, w) < side:
        grow = side / max(h, w)
        ink = _resize(ink, (max(1, round(w * grow)), max(1, round(h * grow))))
    ink = np.clip(ink / max(float(ink.max()), 1e-6), 0.0, 1.0)
    h, w = ink.shape
    scale = side / max(h, w)  # from here to 4x the final size, in (0.5, 1]
    width = stroke_width(ink, INK_LEVEL) * scale
    half = scale / 2  # from here to 2x the final size
    ink = _resize(ink, (max(1, round(w * half)), max(1, round(h * half))))
    ink = np.clip(ink / max(float(ink.max()), 1e-6), 0.0, 1.0)
    if width < STROKE_4X:
        reach = (STROKE_4X - width) / 4.0  # the missing half-width, in 2x pixels
        pad = math.ceil(reach) + 1
        h, w = ink.shape
        padded = np.zeros((h + 2 * pad, w + 2 * pad), dtype=np.float32)
        padded[pad:-pad, pad:-pad] = ink
        # Distance from each pixel to the stroke; a pen of that radius, anti-aliased over a pixel.
        distance = ndimage.distance_transform_edt(padded <= INK_LEVEL)
        pen = np.clip(reach + 0.5 - distance, 0.0, 1.0).astype(np.float32)
        ink = np.maximum(padded, pen)
    h, w = ink.shape
    small = np.clip(_resize(ink, (max(1, round(w / 2)), max(1, round(h / 2)))), 0.0, None)
    return (small / max(float(small.max()), 1e-6)).astype(np.float32)


def center_by_mass(digit: Gray) -> NDArray[np.uint8]:
    """Paste into a 28x28 frame so that the centre of mass is the frame's centre."""
    h, w = digit.shape
    total = float(digit.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cy = float((ys * digit).sum()) / total
    cx = float((xs * digit).sum()) / total
    # Pixel centres: the frame's centre of mass is at (13.5, 13.5).
    top = round((IMAGE_SIZE - 1) / 2 - cy)
    left = round((IMAGE_SIZE - 1) / 2 - cx)
    top = min(max(top, 0), IMAGE_SIZE - h)
    left = min(max(left, 0), IMAGE_SIZE - w)
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    frame[top : top + h, left : left + w] = digit
    return np.round(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)


def preprocess(img: Image.Image) -> NDArray[np.uint8]:
    """Any picture of one digit → 28x28 uint8, white ink on black, MNIST-style (module doc)."""
    ink = find_ink(to_gray(img))
    top, bottom, left, right = ink_box(ink)
    digit = fit_digit(ink[top:bottom, left:right])
    return center_by_mass(digit)


# Fashion-MNIST's images were made from product photos on white (Xiao et al., section 2):
# trim the edges within 5% of the corners' colour, resize the longest edge to 28 px, sharpen
# (a Gaussian of radius and sigma 1), extend to 28x28 centred, negate.
FASHION_TRIM = 0.05
# On a dark ground the picture is already negated (a Fashion-MNIST image itself): its faint
# edges are the item's, made by the dataset's sharpening, and are kept.
FASHION_TRIM_DARK = 2 / 255


def _corners(gray: Gray) -> float:
    """The median of the four corner patches: the background an image was trimmed against."""
    h, w = gray.shape
    k = max(1, round(0.03 * min(h, w)))
    patches = [gray[:k, :k], gray[:k, -k:], gray[-k:, :k], gray[-k:, -k:]]
    return float(np.median(np.concatenate([p.ravel() for p in patches])))


def _background_plane(gray: Gray, level: float) -> Gray:
    """The light falling on the ground, as a plane fitted to the pixels near the corners'
    `level` (a table lit from one side is brighter there); sampled on a grid of about
    128 x 128, so a 1,024-px photo costs a 3-term fit over ~16,000 pixels."""
    h, w = gray.shape
    step = max(1, max(h, w) // 128)
    sample = gray[::step, ::step]
    near = np.abs(sample - level) < 2 * FASHION_TRIM
    if near.sum() < 3:
        return np.full_like(gray, level)
    ys, xs = np.nonzero(near)
    design = np.stack([np.ones(len(ys)), ys * step / h, xs * step / w], axis=1)
    coef = np.linalg.lstsq(design, sample[near].astype(np.float64), rcond=None)[0]
    rows = coef[0] + coef[1] * np.arange(h) / h
    cols = coef[2] * np.arange(w) / w
    plane: Gray = (rows[:, None] + cols[None, :]).astype(np.float32)
    return plane


def _sharpen(image: Gray, sigma: float = 1.0) -> Gray:
    """Unsharp masking: the image plus its difference from a Gaussian blur of it."""
    taps = np.arange(-2, 3, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    h, w = image.shape
    padded = np.pad(image, 2, mode="edge")
    rows = np.zeros((h + 4, w), dtype=np.float32)
    for i, k in enumerate(kernel):
        rows += k * padded[:, i : i + w]
    blurred = np.zeros((h, w), dtype=np.float32)
    for i, k in enumerate(kernel):
        blurred += k * rows[i : i + h, :]
    sharpened: Gray = np.clip(2.0 * image - blurred, 0.0, 1.0).astype(np.float32)
    return sharpened


def fashion_style(img: Image.Image) -> NDArray[np.uint8]:
    """A product photo → 28x28 uint8 the way Fashion-MNIST made its images (above): the
    background is the corners' colour, the product whatever differs from it by over 5%; its box
    is scaled so the longest edge is 28 px (sharpened when that shrank it), placed in the middle
    of 28x28 by its box (not by mass) and negated. A picture already light-on-dark (a
    Fashion-MNIST image itself) is kept as it is, not negated again."""
    gray = to_gray(img)
    level = _corners(gray)
    if level >= 0.5:  # a product on a light ground: dark goes bright, as in the dataset
        background = np.clip(_background_plane(gray, level), 1e-3, 1.0)
        ink = (background - gray) / background
        trim = FASHION_TRIM
    else:
        background = np.full_like(gray, level)
        ink = (gray - level) / (1.0 - level)
        trim = FASHION_TRIM_DARK
    ink = np.clip(ink, 0.0, 1.0).astype(np.float32)
    product = (np.abs(gray - background) > trim).astype(np.float32)
    if float(ink.max()) < MIN_CONTRAST or not product.any():
        raise BlankImage("blank image: nothing stands out from the background")
    top, bottom, left, right = ink_box(product)
    item = ink[top:bottom, left:right]
    h, w = item.shape
    scale = IMAGE_SIZE / max(h, w)
    if scale != 1.0:
        size = (
            min(IMAGE_SIZE, max(1, round(w * scale))),
            min(IMAGE_SIZE, max(1, round(h * scale))),
        )
        item = np.clip(_resize(item, size), 0.0, 1.0)
        if scale < 1.0:  # the reduction blurred it: the dataset sharpened at this point
            item = _sharpen(item)
    h, w = item.shape
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    # An odd margin puts its extra pixel before the item: where 97% of Fashion-MNIST's are.
    top, left = (IMAGE_SIZE - h + 1) // 2, (IMAGE_SIZE - w + 1) // 2
    frame[top : top + h, left : left + w] = item
    return np.round(frame * 255.0).astype(np.uint8)


def resize_plain(img: Image.Image) -> NDArray[np.uint8]:
    """Grayscale (alpha on white) and the whole picture resized to 28x28, nothing else: for
    images that are already framed and coloured the way the model should see them."""
    gray = _resize(to_gray(img), (IMAGE_SIZE, IMAGE_SIZE))
    return np.round(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)


def prepare_image(img: Image.Image, mode: str = "mnist") -> NDArray[np.uint8]:
    """A decoded picture as the model's 28x28 input, prepared the way its training images were
    (`DataConfig.preparation`): MNIST-style (`preprocess`), Fashion-MNIST-style
    (`fashion_style`) or a plain resize."""
    if mode == "resize":
        return resize_plain(img)
    if mode == "fashion":
        return fashion_style(img)
    return preprocess(img)


def preprocess_pixels(pixels: NDArray[Any], mode: str = "mnist") -> NDArray[np.uint8]:
    """A 2-D array of 0..255 values (any size, any polarity) through `prepare_image`."""
    arr = np.clip(np.asarray(pixels, dtype=np.float32), 0, 255).astype(np.uint8)
    return prepare_image(Image.fromarray(arr, mode="L"), mode)


def to_float(images_u8: Tensor, mean: float, std: float) -> Tensor:
    """uint8 pixels (a tensor) to float32 standardised with the dataset's training mean/std:
    step 8 above, and what training applies to every batch."""
    return images_u8.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)
