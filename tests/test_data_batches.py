"""data.batches: epoch order, batches and whole-batch augmentation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnist_resnet import data
from mnist_resnet.config import ConfigError, DataConfig
from mnist_resnet.inference import to_float

# ----------------------------------------------------------------------------- batches


def test_epoch_indices_shards() -> None:
    one = data.epoch_indices(103, epoch=2, seed=1)
    assert torch.equal(one, data.epoch_indices(103, epoch=2, seed=1))
    assert not torch.equal(one, data.epoch_indices(103, epoch=3, seed=1))
    assert sorted(one.tolist()) == list(range(103))
    shards = [data.epoch_indices(103, epoch=2, seed=1, rank=r, world_size=4) for r in range(4)]
    assert {len(s) for s in shards} == {25}
    flat = torch.cat(shards).tolist()
    assert len(set(flat)) == 100  # disjoint
    assert torch.equal(data.epoch_indices(5, epoch=0, seed=0, shuffle=False), torch.arange(5))
    with pytest.raises(ValueError):
        data.epoch_indices(10, epoch=0, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches(drop_last: bool) -> None:
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    labels = torch.arange(10)
    order = torch.randperm(10)
    got = list(data.batches(images, labels, order, 4, drop_last=drop_last))
    assert [len(y) for _, y in got] == ([4, 4] if drop_last else [4, 4, 2])
    assert got[0][0].shape == (4, 1, 28, 28) and got[0][0].dtype == torch.uint8
    assert torch.equal(got[0][0][:, 0], images[order[:4]])
    assert torch.equal(torch.cat([y for _, y in got]), order[: 8 if drop_last else 10])


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference translation with zero fill, one image at a time."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    src = img[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)] = src
    return out


def test_augment_batch_translates_each_image() -> None:
    x = torch.randint(1, 256, (64, 1, 28, 28), dtype=torch.uint8)
    out = data.augment_batch(x, torch.Generator().manual_seed(0), 2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    again = data.augment_batch(x, torch.Generator().manual_seed(0), 2)
    assert torch.equal(out, again)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    seen = set()
    for i in range(len(x)):
        match = [s for s in shifts if torch.equal(out[i], shifted(x[i], *s))]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 10  # shifts vary across the batch
    assert data.augment_batch(x, torch.Generator(), 0) is x


def test_augment_batch_fills_float_background() -> None:
    x = torch.full((8, 1, 28, 28), -0.42)
    out = data.augment_batch(x, torch.Generator().manual_seed(1), 3, fill=-0.42)
    assert torch.equal(out, x)


def test_random_affine() -> None:
    x = torch.rand(16, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    same = data.random_affine(x, g, max_degrees=0.0, scale=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    moved = data.random_affine(x, g)
    assert moved.shape == x.shape and not torch.allclose(moved, x)


def test_elastic_offsets_are_smooth_bounded_and_repeatable() -> None:
    shape = (32, 1, 28, 28)
    a = data.elastic_offsets(shape, torch.Generator().manual_seed(0), alpha=34.0, sigma=4.0)
    b = data.elastic_offsets(shape, torch.Generator().manual_seed(0), alpha=34.0, sigma=4.0)
    assert a.shape == (32, 28, 28, 2) and torch.equal(a, b)
    pixels = a * 14  # grid units back to pixels (2/28 per pixel)
    assert 0.3 < float(pixels.std()) < 3.0  # a stroke bends by about a pixel, not across the digit
    # Smooth: neighbouring pixels move almost together, unlike the raw noise.
    step = (pixels[:, 1:] - pixels[:, :-1]).abs().mean()
    assert float(step) < 0.2 * float(pixels.abs().mean())
    none = data.elastic_offsets(shape, torch.Generator().manual_seed(0), alpha=0.0, sigma=4.0)
    assert torch.equal(none, torch.zeros_like(none))


def test_elastic_distortion_bends_digits_and_leaves_other_recipes_unchanged() -> None:
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 6:22, 13:15] = 1.0  # a vertical stroke: a "1"
    g = torch.Generator().manual_seed(0)
    bent = data.random_affine(x, g, max_degrees=0.0, scale=(1.0, 1.0), elastic=34.0)
    assert not torch.allclose(bent, x, atol=1e-3)
    # The stroke bends and locally thins or thickens, but stays a stroke where it was: no ink
    # lands more than a few pixels from the original column, and most of it survives.
    ink = bent.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert bool(((ink > 0.5) & (ink < 1.5)).all())
    cols = torch.nonzero(bent[:, 0] > 0.5, as_tuple=True)[2]
    assert int(cols.min()) >= 13 - 5 and int(cols.max()) <= 14 + 5
    # Off, it draws nothing from the generator: older runs replay the same augmentation.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    data.random_affine(x, g1)
    torch.rand(2, len(x), generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_random_erase_blanks_one_square_per_image() -> None:
    x = torch.ones(64, 1, 28, 28)
    out = data.random_erase(x.clone(), torch.Generator().manual_seed(0), 6, fill=-0.5)
    hidden = (out == -0.5).sum(dim=(1, 2, 3))
    # A full 6x6 square, or less where it hangs over an edge; never more, never nothing.
    assert int(hidden.max()) == 36 and int(hidden.min()) >= 3 * 3
    assert set(out.unique().tolist()) == {-0.5, 1.0}
    for i in range(len(out)):
        rows, cols = torch.nonzero(out[i, 0] == -0.5, as_tuple=True)
        box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
        assert box == int(hidden[i])  # one solid rectangle
    assert data.random_erase(x, torch.Generator(), 0) is x


def test_random_flip_mirrors_about_half_and_only_when_asked() -> None:
    x = torch.randint(0, 256, (400, 1, 28, 28), dtype=torch.uint8)
    out = data.random_flip(x, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((mirrored ^ kept).all())  # each image one or the other, never changed otherwise
    assert 140 <= int(mirrored.sum()) <= 260  # 200 expected; 6 standard deviations either way
    # Off (the default), the batch and the generator's stream are what they always were.
    cfg = DataConfig(max_shift=2)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = data.training_batch(x, cfg, g1, 0.1, 0.3)
    b = data.training_batch(x, dataclasses.replace(cfg, flip=True), g2, 0.1, 0.3)
    assert not torch.equal(a, b)
    g3 = torch.Generator().manual_seed(4)
    expected = to_float(data.augment_batch(x, g3, 2), 0.1, 0.3)
    assert torch.equal(a, expected) and torch.equal(g1.get_state(), g3.get_state())


def test_training_batch_applies_what_the_config_asks() -> None:
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    plain = data.training_batch(x, DataConfig(augment=False), torch.Generator(), 0.1, 0.3)
    assert torch.equal(plain, to_float(x, 0.1, 0.3))
    cfg = DataConfig(max_shift=0, rotate=10.0, scale=0.1, erase=6)
    a = data.training_batch(x, cfg, torch.Generator().manual_seed(3), 0.1, 0.3)
    b = data.training_batch(x, cfg, torch.Generator().manual_seed(3), 0.1, 0.3)
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b)  # a pure function of the generator: resume repeats it exactly
    assert not torch.allclose(a, plain)
    # Background stays background: rotation and Cutout fill with the standardised zero pixel.
    blank = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    out = data.training_batch(blank, cfg, torch.Generator().manual_seed(1), 0.1, 0.3)
    assert torch.allclose(out, torch.full_like(out, -0.1 / 0.3), atol=1e-5)


def test_augment_generator_on_the_cpu_is_the_old_stream() -> None:
    # The CPU path keeps its batches: a CPU augmentation generator is the plain torch.Generator
    # every earlier run was seeded with.
    g = data.augment_generator(torch.device("cpu"), 123)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(123).get_state())


FULL_AUGMENTATION = DataConfig(max_shift=2, rotate=10.0, scale=0.1, erase=6, elastic=20.0)


def test_whole_batch_augmentation_keeps_shape_dtype_and_range() -> None:
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    mean, std = 0.1307, 0.3081
    out = data.training_batch(x, FULL_AUGMENTATION, torch.Generator().manual_seed(0), mean, std)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    # Bilinear sampling mixes pixel values and the fill is the background: nothing leaves the
    # standardised range of uint8 pixels (up to float rounding).
    lo, hi = -mean / std, (1 - mean) / std
    assert float(out.min()) >= lo - 1e-5 and float(out.max()) <= hi + 1e-5
    # One call transforms the batch, each image its own way: the same digit repeated comes out
    # as different images.
    same = x[:1].expand(64, -1, -1, -1).contiguous()
    moved = data.training_batch(same, FULL_AUGMENTATION, torch.Generator().manual_seed(0), 0, 1)
    assert len({tuple(img.flatten().tolist()) for img in moved}) == 64


def test_augmentation_runs_where_the_images_are() -> None:
    # Images on another device than the generator (here "meta", the shape-only device every
    # torch build has): every random draw is moved to the images, so a batch never leaves the
    # device it lives on. (A generator on the GPU beside the images draws there directly.)
    x = torch.empty(8, 1, 28, 28, dtype=torch.uint8, device="meta")
    out = data.training_batch(x, FULL_AUGMENTATION, torch.Generator().manual_seed(0), 0.1, 0.3)
    assert out.device.type == "meta" and out.shape == x.shape and out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augmentation_on_a_cuda_generator_stays_on_the_gpu() -> None:
    cuda = torch.device("cuda")
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, device=cuda)
    a = data.training_batch(x, FULL_AUGMENTATION, data.augment_generator(cuda, 7), 0.1, 0.3)
    b = data.training_batch(x, FULL_AUGMENTATION, data.augment_generator(cuda, 7), 0.1, 0.3)
    assert a.device.type == "cuda" and a.shape == x.shape and torch.equal(a, b)


@pytest.mark.parametrize(
    "field,value",
    [
        ("rotate", 45.0),
        ("rotate", -1.0),
        ("scale", 0.6),
        ("erase", 29),
        ("elastic", -1.0),
        ("elastic", 61.0),
        ("elastic_sigma", 0.5),
    ],
)
def test_augmentation_limits_are_checked(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        dataclasses.replace(DataConfig(), **{field: value}).validate()
