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
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

IMAGE_SIZE = 28
DIGIT_BOX = 20
# A 48-MP phone photo is 12 MB as JPEG; a 30,000 x 30,000 canvas (900 MP) is a bomb.
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 50_000_000
# Work on at most this many pixels per side: plenty for a digit, and bounds memory and time.
WORK_SIDE = 1024
# Below this contrast between background and ink (on a 0..1 scale) there is no digit to read.
MIN_CONTRAST = 0.08
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

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


def decode(payload: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode the first frame of an image, bounded in pixels; every failure is one line."""
    if not payload:
        raise UnreadableImage("empty file (0 bytes)")
    # Decoders of untrusted bytes fail in many ways (OSError, SyntaxError, struct errors, ...);
    # every one of them means "not a usable image", so all are turned into one message.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(payload))
            # JPEG can decode straight at a reduced scale: far faster and smaller for big
            # photos, so the pixel budget applies to what will really be decoded.
            img.draft("RGB", (WORK_SIDE, WORK_SIDE))
            width, height = img.size
            if width * height > max_pixels:
                raise UnreadableImage(
                    f"image is {width} x {height} pixels, over the {max_pixels:,}-pixel limit "
                    "(a decompression bomb or an absurdly large picture)"
                )
            if width < 1 or height < 1:
                raise UnreadableImage(f"image has no pixels ({width} x {height})")
            img.load()
            img = _reduced(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (unknown or unsupported format)") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UnreadableImage(f"corrupt or truncated image: {first}") from None
    return img


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


def _border(gray: Gray) -> Gray:
    h, w = gray.shape
    k = max(1, round(0.03 * min(h, w)))
    return np.concatenate(
        [gray[:k].ravel(), gray[-k:].ravel(), gray[:, :k].ravel(), gray[:, -k:].ravel()]
    )


def ink_polarity(gray: Gray) -> Gray:
    """Bright ink on dark background: inverted when the background is lighter than the ink."""
    background = float(np.median(_border(gray)))
    lo, hi = np.percentile(gray, [0.5, 99.5])
    return (1.0 - gray).astype(np.float32) if background - lo > hi - background else gray


def _otsu(values: NDArray[np.float32]) -> float:
    # 256 equal bins over [0, 1] by integer binning: np.histogram's general path cost more than
    # the rest of the threshold.
    inside = values[(values >= 0.0) & (values <= 1.0)]
    hist = np.bincount(np.minimum((inside * 256.0).astype(np.intp), 255), minlength=256)
    p = hist.astype(np.float64) / max(1, hist.sum())
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1.0 - omega), 1e-12)
    return float(int(np.argmax(between)) + 1) / 256.0


def flatten_background(ink: Gray) -> Gray:
    """Subtract a quadratic fit of the background (uneven light on paper), stretch to [0, 1]."""
    h, w = ink.shape
    background = (ink < _otsu(ink)).astype(np.float64)
    if background.sum() >= 12:
        # Least squares over every background pixel, by the normal equations of the six terms
        # 1, y, x, y^2, x^2, yx. Their sums are separable moments (powers of y) @ mask @ (powers
        # of x), so nothing of size pixels x terms is built: a tall design matrix and its SVD
        # were most of a served request's time (docs/serving.md).
        ys = np.arange(h, dtype=np.float64) / h - 0.5
        xs = np.arange(w, dtype=np.float64) / w - 0.5
        y_pow = np.stack([ys**k for k in range(5)])
        x_pow = np.stack([xs**k for k in range(5)])
        moments = y_pow @ background @ x_pow.T  # moments[a, b] = sum of y^a x^b
        weighted = y_pow[:3] @ (background * ink) @ x_pow[:3].T
        terms = ((0, 0), (1, 0), (0, 1), (2, 0), (0, 2), (1, 1))  # (power of y, power of x)
        gram = np.array([[moments[a + c, b + d] for c, d in terms] for a, b in terms])
        rhs = np.array([weighted[a, b] for a, b in terms])
        try:
            coef = np.linalg.solve(gram, rhs)
        except np.linalg.LinAlgError:
            coef = np.linalg.lstsq(gram, rhs)[0]
        rows = coef[0] + coef[1] * ys + coef[3] * ys * ys
        cols = coef[2] * xs + coef[4] * xs * xs
        surface = rows[:, None] + cols[None, :] + coef[5] * np.outer(ys, xs)
        ink = ink - surface.astype(np.float32)
    else:
        ink = ink - float(np.median(ink))
    top = float(np.percentile(ink, 99.9))
    if top < MIN_CONTRAST:
        raise BlankImage("blank image: no ink found (uniform canvas)")
    ink = np.clip(ink / top, 0.0, 1.0)
    # Paper grain and JPEG noise sit well under the ink: cut what the ink/background split
    # puts on the background side, keeping the anti-aliased edges above it.
    floor = 0.5 * _otsu(ink)
    cleaned: Gray = np.clip((ink - floor) / (1.0 - floor), 0.0, 1.0).astype(np.float32)
    return cleaned


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


def _dilate(ink: Gray, size: int) -> Gray:
    pad = size // 2
    padded = np.pad(ink, pad)
    h, w = ink.shape
    out = ink.copy()
    for dy in range(size):
        for dx in range(size):
            np.maximum(out, padded[dy : dy + h, dx : dx + w], out=out)
    return out


def stroke_width(ink: Gray) -> float:
    """Mean stroke width in pixels: a stroke of width w and length L has area wL, outline 2L."""
    mask = ink > 0.5
    area = int(mask.sum())
    if not area:
        return 0.0
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    outline = max(1, area - int(interior.sum()))
    return 2.0 * area / outline


def fit_digit(ink: Gray) -> Gray:
    """The cropped ink scaled so its longer side is 20 px, strokes at least MNIST-thick."""
    h, w = ink.shape
    # Work at 4x the final size: strokes are measured and thickened there, then averaged down.
    scale = 4 * DIGIT_BOX / max(h, w)
    big = _resize(ink, (max(1, round(w * scale)), max(1, round(h * scale))))
    big = np.clip(big / max(float(big.max()), 1e-6), 0.0, 1.0)
    # MNIST strokes are about 2-3 px at 20 px height, i.e. 8-12 px at this scale.
    width = stroke_width(big)
    if width < 6.0:
        big = _dilate(big, max(3, round(8.0 - width) | 1))
    bh, bw = big.shape
    out_w = max(1, round(bw / 4))
    out_h = max(1, round(bh / 4))
    small = np.clip(_resize(big, (out_w, out_h)), 0.0, None)
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
    gray = to_gray(img)
    if _contrast(gray) < MIN_CONTRAST:
        raise BlankImage("blank image: no ink found (uniform canvas)")
    ink = flatten_background(ink_polarity(gray))
    top, bottom, left, right = ink_box(ink)
    digit = fit_digit(ink[top:bottom, left:right])
    return center_by_mass(digit)


# Fashion-MNIST's images were made from product photos on white (Xiao et al. 2017, section 2):
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
