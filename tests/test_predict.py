"""predict: MNIST-style preprocessing of arbitrary pictures, and one-line errors for bad files."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_resnet import data
from mnist_resnet.checkpoint import load_model
from mnist_resnet.cli import main
from mnist_resnet.config import DataConfig
from mnist_resnet.images import (
    BlankImage,
    UnreadableImage,
    decode,
    fashion_style,
    prepare_image,
    preprocess,
)
from mnist_resnet.predict import Predictor


@pytest.fixture(scope="module")
def digits(mnist_root: Path) -> tuple[np.ndarray, np.ndarray]:
    splits = data.load("mnist", mnist_root, log=lambda _: None)
    return splits.test_images[:100].numpy(), splits.test_labels[:100].numpy()


@pytest.fixture(scope="module")
def predictor(small_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(small_checkpoint)


def _photo(digit: np.ndarray, seed: int = 0) -> Image.Image:
    """A dark-pen digit on unevenly lit paper, off centre in a large RGB frame, with noise."""
    rng = np.random.default_rng(seed)
    ink = np.asarray(Image.fromarray(digit).resize((300, 300), Image.Resampling.BICUBIC)) / 255
    h, w = 700, 500
    yy, xx = np.mgrid[0:h, 0:w]
    page = 0.9 - 0.25 * xx / w - 0.1 * (yy / h) ** 2
    page[100:400, 150:450] *= 1 - 0.85 * ink
    page += rng.normal(0, 0.02, page.shape)
    gray = (np.clip(page, 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([gray, gray, (gray * 0.9).astype(np.uint8)], axis=2)  # a slightly warm paper
    return Image.fromarray(rgb)


def _variants(digit: np.ndarray) -> dict[str, Image.Image]:
    big = np.asarray(Image.fromarray(digit).resize((280, 350), Image.Resampling.BICUBIC))
    m = big[..., None] / 255.0
    red_on_yellow = ((1 - m) * [240, 220, 60] + m * [190, 20, 20]).astype(np.uint8)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = digit
    return {
        "L": Image.fromarray(digit),
        "inverted": Image.fromarray(255 - big),
        "red-on-yellow": Image.fromarray(red_on_yellow),
        "white-on-transparent": Image.fromarray(rgba, "RGBA"),
        "I;16": Image.fromarray(digit.astype(np.uint16) * 257),
        "P": Image.fromarray(255 - big).convert("P"),
        "LA": Image.fromarray(255 - big).convert("LA"),
        "photo": _photo(digit),
    }


@pytest.mark.numerics
def test_preprocessing_keeps_mnist_digits_and_their_predictions(
    digits: tuple[np.ndarray, np.ndarray], predictor: Predictor
) -> None:
    images, labels = digits
    again = np.stack([preprocess(Image.fromarray(d)) for d in images])
    # Same framing as MNIST: a 20-px box centred by mass, so the round trip barely moves pixels.
    assert again.shape == (100, 28, 28) and again.dtype == np.uint8
    assert np.abs(again.astype(int) - images.astype(int)).mean() < 25
    direct = predictor.probabilities(images).argmax(1).numpy()
    redone = predictor.probabilities(again).argmax(1).numpy()
    # The test model agrees on all 100 under every kernel set tried (conftest.small_checkpoint).
    # Inverted, transposed or zoomed-in digits agree on 2%, 8% and 89%; shifts by 3-4 pixels
    # still agree (the model trains with shifts) but fail the pixel distance above (33-36).
    assert (redone == direct).mean() >= 0.95
    assert (redone == labels).mean() >= 0.9


@pytest.mark.numerics
def test_sizes_colours_modes_and_photos_give_mnist_like_inputs(
    digits: tuple[np.ndarray, np.ndarray], predictor: Predictor
) -> None:
    images, labels = digits
    reference = np.stack([preprocess(Image.fromarray(d)) for d in images[:20]])
    variants = [_variants(d) for d in images[:20]]
    for name in variants[0]:
        seen = np.stack([preprocess(v[name]) for v in variants])
        # Ink white on black, digit in the 20-px box, centre of mass in the middle.
        assert seen[:, 0, :].max() < 64 and seen[:, :, 0].max() < 64, name
        ys, xs = np.mgrid[0:28, 0:28]
        mass = seen.astype(float).sum(axis=(1, 2))
        assert np.allclose((seen * ys).sum(axis=(1, 2)) / mass, 13.5, atol=1.0), name
        assert np.allclose((seen * xs).sum(axis=(1, 2)) / mass, 13.5, atol=1.0), name
        predicted = predictor.probabilities(seen).argmax(1).numpy()
        agree = (predicted == predictor.probabilities(reference).argmax(1).numpy()).mean()
        assert agree >= 0.85, f"{name}: {agree:.0%} agree with the plain digits"
        assert (predicted == labels[:20]).mean() >= 0.8, name


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of `width` x `height` zero pixels: ~100 KB that inflate to ~110 MB."""
    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "empty": folder / "empty.png",
        "text": folder / "notes.png",
        "truncated": folder / "truncated.png",
        "bomb": folder / "bomb.png",
        "huge": folder / "huge.gif",
        "blank": folder / "blank.png",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    buf = folder / "whole.png"
    Image.fromarray((np.random.default_rng(0).random((200, 200)) * 255).astype(np.uint8)).save(buf)
    files["truncated"].write_bytes(buf.read_bytes()[:400])
    buf.unlink()
    files["bomb"].write_bytes(_png_bomb(30000, 30000))
    # A 7x5 GIF whose screen and frame headers are rewritten to claim 30,000 x 30,000.
    small = io.BytesIO()
    Image.new("P", (7, 5)).save(small, "GIF")
    gif = bytearray(small.getvalue())
    frame = gif.index(b"\x2c\x00\x00\x00\x00\x07\x00\x05\x00")
    gif[6:10] = gif[frame + 5 : frame + 9] = (30000).to_bytes(2, "little") * 2
    files["huge"].write_bytes(bytes(gif))
    Image.new("RGB", (64, 64), (250, 250, 250)).save(files["blank"])
    return files


def test_hostile_files_each_get_one_line(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    for name, path in files.items():
        with pytest.raises((UnreadableImage, BlankImage)) as info:
            preprocess(decode(path.read_bytes()))
        message = str(info.value)
        assert message and "\n" not in message, name
        assert isinstance(info.value, BlankImage) == (name == "blank"), name
    for name in ("bomb", "huge"):
        with pytest.raises(UnreadableImage, match="decompression bomb"):
            decode(files[name].read_bytes())
    # Between our 50 MP limit and Pillow's own: refused before a pixel is decoded.
    with pytest.raises(UnreadableImage, match="pixel limit"):
        decode(_png_bomb(8000, 8000))


@pytest.mark.numerics
def test_cli_reports_every_file_and_fails_only_on_unreadable(
    tmp_path: Path,
    small_checkpoint: Path,
    digits: tuple[np.ndarray, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    images, labels = digits
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        _variants(images[i])["red-on-yellow"].save(good / f"d{i}.jpg", quality=90)
    _photo(images[3]).save(good / "photo.webp")
    _variants(images[4])["I;16"].save(good / "deep.tif")
    Image.fromarray(255 - images[5]).save(good / "paper.bmp")
    argv = ["predict", str(small_checkpoint), str(good), "--json"]
    assert main([*argv, "--save-preprocessed", str(tmp_path / "seen")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 6 and all("prediction" in r for r in out)
    assert all(len(r["top"]) == 3 for r in out)
    assert sum(r["top"][0]["probability"] >= r["top"][1]["probability"] for r in out) == 6
    assert len(list((tmp_path / "seen").glob("*.png"))) == 6
    truth = {"d0.jpg": 0, "d1.jpg": 1, "d2.jpg": 2, "photo.webp": 3, "deep.tif": 4, "paper.bmp": 5}
    hits = sum(int(r["prediction"]) == labels[truth[Path(r["file"]).name]] for r in out)
    assert hits >= 5

    bad = _bad_files(tmp_path / "bad")
    assert main(["predict", str(small_checkpoint), str(good / "d0.jpg"), str(bad["blank"])]) == 0
    capsys.readouterr()
    pattern = str(tmp_path / "bad" / "*")
    assert main(["predict", str(small_checkpoint), str(good / "d0.jpg"), pattern, "nope.png"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 + len(bad) + 1 + 1  # good file, bad files, missing file, summary
    assert lines[0].startswith(str(good / "d0.jpg") + ": ")
    assert sum(": error: " in line for line in lines) == len(bad) + 1
    assert lines[-1] == f"predicted 1 of {len(bad) + 2} inputs"


def _garment() -> np.ndarray:
    """A shaded shirt-like item, bright on black, 28 px tall and 20 wide, where Fashion-MNIST
    puts such an item (centred by its box)."""
    item = np.zeros((28, 28), np.uint8)
    y, x = np.mgrid[0:28, 0:20]
    shape = ((x >= 5) & (x < 15)) | (y < 9)  # sleeves across the top, the body below
    item[:, 4:24] = np.where(shape, 90 + 4 * y + 3 * x, 0)
    return item


def _product_photo(item: np.ndarray, scale: int = 8, side: int = 300) -> Image.Image:
    """`item` as a photo of the product: dark on a light-grey table lit unevenly (215-245),
    8x larger, off centre, with noise (benchmarks/fashion_inputs.py makes 2,000 such)."""
    big = Image.fromarray(item).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    ys, xs = np.mgrid[0:side, 0:side] / side
    reflectance = np.ones((side, side))
    reflectance[30 : 30 + 28 * scale, 60 : 60 + 28 * scale] = 1 - np.asarray(big) / 255
    noise = np.random.default_rng(0).normal(0.0, 2.0, (side, side))
    photo = (215 + 15 * ys + 15 * xs) * reflectance + noise
    return Image.fromarray(np.clip(np.round(photo), 0, 255).astype(np.uint8))


def test_fashion_preparation_undoes_a_product_photo_and_keeps_a_fashion_mnist_image() -> None:
    item = _garment()
    # Already a Fashion-MNIST image: kept as it is.
    assert np.array_equal(prepare_image(Image.fromarray(item), "fashion"), item)
    photo = _product_photo(item)
    fashion = fashion_style(photo)
    assert np.array_equal(prepare_image(photo, "fashion"), fashion)
    rows, cols = np.nonzero(fashion > 30)
    assert (rows.min(), rows.max()) == (0, 27)  # the longest edge is 28 px again
    assert cols.min() >= 3 and cols.max() <= 24  # and the item is centred by its box
    # Mean difference per pixel from the item photographed (of 255): 10.4 by this
    # preparation, 46.3 by the MNIST-style one, which fits the item into 20 px by its mass.
    assert np.abs(fashion.astype(int) - item).mean() < 16
    assert np.abs(preprocess(photo).astype(int) - item).mean() > 30


def test_models_prepare_pictures_the_way_their_training_images_were_made(
    small_checkpoint: Path,
) -> None:
    assert DataConfig(dataset="fashion-mnist").preparation == "fashion"
    assert DataConfig(dataset="mnist", preprocess="resize").preparation == "mnist"  # unused there
    assert DataConfig(dataset="folder:/x", preprocess="fashion").preparation == "fashion"
    DataConfig(dataset="folder:/x", preprocess="fashion").validate()
    # A Fashion-MNIST checkpoint saved preprocess "mnist" (the default) before the mode existed.
    loaded = load_model(small_checkpoint)
    assert loaded.data_config.preprocess == "mnist"
    fashion = dataclasses.replace(
        loaded, data_config=dataclasses.replace(loaded.data_config, dataset="fashion-mnist")
    )
    assert Predictor(loaded).preprocess == "mnist" and Predictor(fashion).preprocess == "fashion"
