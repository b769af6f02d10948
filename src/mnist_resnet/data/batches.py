"""Batches cut from whole uint8 tensors and augmented as whole tensors: shifts, rotation and
zoom, elastic distortion and Cutout, all from explicit generators so a run can resume exactly.

Everything runs where the tensors live. Random numbers are drawn on the generator's device: a
CPU generator gives the same batches wherever the images are, a generator on the GPU beside the
images (`augment_generator`) lets a whole epoch run there without a host round trip per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mnist_resnet.config import DataConfig
from mnist_resnet.inference import to_float


def epoch_indices(
    n: int, *, epoch: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
) -> Tensor:
    """This rank's sample order for one epoch; ranks get disjoint shards of equal length."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if shuffle:
        # One stream per (seed, epoch); every rank computes the same permutation.
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    per_rank = n // world_size  # equal counts keep collective ops in step across ranks
    return order[rank : per_rank * world_size : world_size]


def augment_generator(device: torch.device, seed: int) -> torch.Generator:
    """The augmentation stream of one epoch, drawn on `device` (its numbers depend on the
    device kind: a CUDA generator gives other, equally random, numbers than a CPU one)."""
    return torch.Generator(device=device).manual_seed(seed)


def batches(
    images_u8: Tensor, labels: Tensor, indices: Tensor, batch_size: int, *, drop_last: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (B,1,28,28) uint8 images and (B,) labels in `indices` order."""
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield images_u8[idx].unsqueeze(1), labels[idx]


def augment_batch(x: Tensor, generator: torch.Generator, max_shift: int, fill: float = 0) -> Tensor:
    """Translate each image of a (B,C,H,W) batch by up to `max_shift` pixels, filling with `fill`.

    Pad once, view every possible window of every image, pick one per image: a single indexing
    op for the whole batch, faster than two gathers. `fill` is the background: 0 for uint8,
    (0 - mean) / std after `to_float`.
    """
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    n = 2 * max_shift + 1
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    sb, sc, sh, sw = padded.stride()
    windows = padded.as_strided((b, c, n, n, h, w), (sb, sc, sh, sw, sh, sw))  # a view, no copy
    g = generator
    dy, dx = torch.randint(0, n, (2, b), generator=g, device=g.device).to(x.device)
    return windows[torch.arange(b, device=x.device), :, dy, dx]


def elastic_offsets(
    shape: Sequence[int], generator: torch.Generator, *, alpha: float, sigma: float
) -> Tensor:
    """Random smooth displacement fields (Simard et al. 2003) for a (B,C,H,W) batch.

    Uniform noise in [-1, 1] per pixel and axis, blurred by a Gaussian of `sigma` pixels (two
    1-D convolutions), scaled by `alpha` pixels. Returned as (B,H,W,2) offsets in grid_sample's
    [-1, 1] coordinates, ready to add to a sampling grid, on the generator's device.
    """
    b, _, h, w = shape
    device = generator.device
    noise = torch.rand(b * 2, 1, h, w, generator=generator, device=device) * 2 - 1
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    noise = F.conv2d(noise, kernel.view(1, 1, 1, -1), padding=(0, radius))
    noise = F.conv2d(noise, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    pixels = noise.view(b, 2, h, w) * alpha
    # align_corners=False: one pixel is 2/W (x) or 2/H (y) in grid units.
    return torch.stack((pixels[:, 0] * (2 / w), pixels[:, 1] * (2 / h)), dim=-1)


def random_affine(
    x: Tensor,
    generator: torch.Generator,
    *,
    max_degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    elastic: float = 0.0,
    elastic_sigma: float = 4.0,
    fill: float = 0.0,
) -> Tensor:
    """Small random rotation and scaling of a float (B,C,H,W) batch, plus an elastic distortion
    when `elastic` > 0: one bilinear grid_sample for all of it.
    """
    b = x.shape[0]
    u = torch.rand(2, b, generator=generator, device=generator.device).to(x.device, x.dtype)
    angle = (u[0] * 2 - 1) * math.radians(max_degrees)
    zoom = scale[0] + u[1] * (scale[1] - scale[0])
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> input mapping
    zero = torch.zeros_like(cos)
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(b, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if elastic > 0:
        # Drawn after the affine parameters, so recipes without it keep their random stream.
        offsets = elastic_offsets(x.shape, generator, alpha=elastic, sigma=elastic_sigma)
        grid = grid + offsets.to(x.device, grid.dtype)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


def random_erase(x: Tensor, generator: torch.Generator, size: int, fill: float = 0.0) -> Tensor:
    """Cutout (DeVries & Taylor 2017): blank one `size` x `size` square per image, in place.

    The square's centre is uniform over the image, so it may hang over an edge and hide less:
    the network learns to read digits with a stroke missing, never with the whole digit gone.
    """
    if size <= 0:
        return x
    b, _, h, w = x.shape
    g = generator
    cy = torch.randint(0, h, (b, 1, 1), generator=g, device=g.device).to(x.device)
    cx = torch.randint(0, w, (b, 1, 1), generator=g, device=g.device).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    lo = size // 2
    hide = (rows >= cy - lo) & (rows < cy - lo + size) & (cols >= cx - lo) & (cols < cx - lo + size)
    return x.masked_fill_(hide.unsqueeze(1), fill)


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image of `x` (N, C, H, W) mirrored left to right with probability 1/2."""
    g = generator
    mirror = torch.rand(x.shape[0], generator=g, device=g.device).to(x.device) < 0.5
    return torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)


def training_batch(
    images_u8: Tensor, cfg: DataConfig, generator: torch.Generator, mean: float, std: float
) -> Tensor:
    """The float batch the network trains on: augmented as `cfg` says, then standardised.

    Translation runs on uint8 (zero fill is exactly the background); rotation/scaling, elastic
    distortion and Cutout run after standardising, filling with the standardised background value.
    """
    if cfg.augment:
        images_u8 = augment_batch(images_u8, generator, cfg.max_shift)
        if cfg.flip:
            images_u8 = random_flip(images_u8, generator)
    x = to_float(images_u8, mean, std)
    if not cfg.augment:
        return x
    background = -mean / std
    if cfg.rotate > 0 or cfg.scale > 0 or cfg.elastic > 0:
        x = random_affine(
            x,
            generator,
            max_degrees=cfg.rotate,
            scale=(1.0 - cfg.scale, 1.0 + cfg.scale),
            elastic=cfg.elastic,
            elastic_sigma=cfg.elastic_sigma,
            fill=background,
        )
    return random_erase(x, generator, cfg.erase, fill=background)
