"""ResNet classifiers for 28x28 images (He et al. 2015, CIFAR-style) and the pytorch/examples CNN.

Order follows torchvision's ``models/resnet.py``: conv helpers, blocks, ``ResNet``, builders.
Each block builds its own shortcut in ``__init__`` (as in hysts' CIFAR ResNet), so a block is
self-contained and ``shortcut=False`` gives the paper's "plain net" with exactly the same layers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

from mnist_resnet.config import ConfigError, ModelConfig, blocks_per_stage

# MNIST, Fashion-MNIST and KMNIST are all 28x28; shapes in `summary` are computed from this.
IMAGE_SIZE = 28
STAGE_WIDTHS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)

# One view of an image: (rows down, columns right, mirrored left to right).
View = tuple[int, int, bool]
_SHIFTS: tuple[View, ...] = (
    (0, 0, False),
    (0, 1, False),
    (0, -1, False),
    (1, 0, False),
    (-1, 0, False),
)
# The views of each `config.TTA` name; the image as given first (`given_view` relies on it).
VIEWS: dict[str, tuple[View, ...]] = {
    "none": _SHIFTS[:1],
    "shift-x": _SHIFTS[:3],
    "shift": _SHIFTS,
    "shift-flip": _SHIFTS + tuple((dy, dx, True) for dy, dx, _ in _SHIFTS),
}


def average_views(
    logits_of: Callable[[Tensor], Tensor], x: Tensor, views: tuple[View, ...]
) -> Tensor:
    """log of the mean class probability over `views` of each image in `x` (N, C, H, W): valid
    logits (their softmax is that mean). All views run as one batch, view by view, so that a
    layer's output holds the image as given in its first N rows."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    # The row or column shifted in repeats the edge, which in these images is background; a
    # zero fill would be background only before normalisation.
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    batch = []
    for dy, dx, mirrored in views:
        view = padded[:, :, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        batch.append(view.flip(-1) if mirrored else view)
    log_p = logits_of(torch.cat(batch)).float().log_softmax(dim=1)
    log_p = log_p.reshape(len(views), n, log_p.shape[-1])
    return torch.logsumexp(log_p, dim=0) - math.log(len(views))


@contextmanager
def views_off(model: nn.Module) -> Iterator[None]:
    """While open, the ResNets in `model` predict from the images as given, one view each."""
    nets = [m for m in model.modules() if isinstance(m, ResNet)]
    saved = [net.views for net in nets]
    for net in nets:
        net.views = VIEWS["none"]
    try:
        yield
    finally:
        for net, views in zip(nets, saved, strict=True):
            net.views = views


def given_view(model: nn.Module, out: Tensor) -> Tensor:
    """The rows of a layer's output (seen by a forward hook on `model`'s parts) that belong to
    the images as given, when the ResNet in `model` averages views at test time."""
    net = next((m for m in model.modules() if isinstance(m, ResNet)), None)
    if net is None or net.training or len(net.views) == 1:
        return out
    return out[: out.shape[0] // len(net.views)]


# `groups`: the networks of an ensemble side by side (`ResNet(members=...)`), each conv seeing
# only its own network's channels.
def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm that follows every conv has its own shift.
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=1, bias=False, groups=groups
    )


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, groups=groups)


def _make_shortcut(in_channels: int, out_channels: int, stride: int, groups: int) -> nn.Module:
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    # Projection shortcut (the paper's option B): learnable, and only where the shape changes.
    return nn.Sequential(
        conv1x1(in_channels, out_channels, stride, groups), nn.BatchNorm2d(out_channels)
    )


class PlainBlock(nn.Module):
    """Two 3x3 convs (the paper's "basic" block); ``shortcut=False`` drops the skip entirely.
    With `groups` > 1 it is that many blocks side by side (channel counts are their sums)."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        shortcut: bool = True,
        groups: int = 1,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv3x3(in_channels, planes, stride, groups)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, out_channels, groups=groups)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # None rather than a zero branch: a plain net must not even own projection weights,
        # so its parameter count is the residual net's minus the projections.
        self.shortcut: nn.Module | None = (
            _make_shortcut(in_channels, out_channels, stride, groups) if shortcut else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        out = self.relu(out)
        return out


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as in torchvision v1.5), 1x1 expand to planes * 4."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        shortcut: bool = True,
        groups: int = 1,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes, groups=groups)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, groups)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels, groups=groups)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = (
            _make_shortcut(in_channels, out_channels, stride, groups) if shortcut else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        out = self.relu(out)
        return out


Block = type[PlainBlock] | type[BottleneckBlock]


def _scaled(base: int, width: float) -> int:
    return max(1, round(base * width))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, three stages of 16/32/64 planes at strides 1/2/2, GAP, linear.

    A 3x3 stride-1 stem and no max-pool, because a 28x28 image has no resolution to spare;
    `stem_pool=True` adds a 2x2 max-pool after the stem for speed recipes (every stage then runs
    on a quarter of the pixels); `stem_stride=2` and `stem_unshuffle=True` (2x2 pixels become 4
    channels before the stem conv) get there without ever building a 28x28 map.

    `members` > 1 makes it that many such networks side by side in one module, an ensemble:
    every layer holds each member's channels in turn and its convs are grouped so that no
    member sees another's; the output is the log of the members' mean class probability
    (`stack_members` fills it from trained networks).
    """

    def __init__(
        self,
        block: Block,
        blocks_per_stage: int,
        *,
        width: float = 1.0,
        shortcut: bool = True,
        zero_init_residual: bool = False,
        in_channels: int = 1,
        num_classes: int = 10,
        stem_pool: bool = False,
        stem_stride: int = 1,
        pool_before_norm: bool = False,
        stem_unshuffle: bool = False,
        views: tuple[View, ...] = VIEWS["none"],
        members: int = 1,
    ) -> None:
        super().__init__()
        # Test-time views (`config.TTA`): averaged in eval mode only.
        self.views = views
        self.block = block
        self.blocks_per_stage = blocks_per_stage
        self.has_shortcut = shortcut
        self.members = members
        self.num_classes = num_classes
        stem_channels = _scaled(STAGE_WIDTHS[0], width) * members
        self.unshuffle: nn.Module = nn.PixelUnshuffle(2) if stem_unshuffle else nn.Identity()
        stem_inputs = in_channels * 4 if stem_unshuffle else in_channels
        # Every member's stem reads the whole picture: one ungrouped conv holds them all.
        self.conv1 = conv3x3(stem_inputs, stem_channels, stem_stride)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.stem_pool: nn.Module = nn.MaxPool2d(2) if stem_pool else nn.Identity()
        self.pool_before_norm = pool_before_norm
        channels = stem_channels
        stages = []
        for base, stride in zip(STAGE_WIDTHS, STAGE_STRIDES, strict=True):
            planes = _scaled(base, width) * members
            stages.append(self._make_stage(block, channels, planes, stride, shortcut))
            channels = planes * block.expansion
        # Named like torchvision (layer1..3) so state-dict keys read the same; `stages` groups them.
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Each member's own linear head: a grouped 1x1 conv over the pooled features.
        self.fc: nn.Module = (
            nn.Linear(channels, num_classes)
            if members == 1
            else nn.Conv2d(channels, num_classes * members, 1, groups=members)
        )
        self._init_weights(zero_init_residual and shortcut)

    def _make_stage(
        self, block: Block, in_channels: int, planes: int, stride: int, shortcut: bool
    ) -> nn.Sequential:
        groups = self.members
        layers: list[nn.Module] = [block(in_channels, planes, stride, shortcut, groups)]
        for _ in range(1, self.blocks_per_stage):
            layers.append(block(planes * block.expansion, planes, 1, shortcut, groups))
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Each residual branch starts at zero, so every block starts as identity and the deep
        # net trains like a shallow one at first (Goyal et al.). Without shortcuts a zero
        # gamma would output a constant and block all gradient, so the caller passes False then.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BottleneckBlock):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, PlainBlock):
                    nn.init.zeros_(m.bn2.weight)

    @property
    def stages(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
        return (self.layer1, self.layer2, self.layer3)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or len(self.views) == 1:
            return self.logits(x)
        return average_views(self.logits, x, self.views)

    def logits(self, x: Tensor) -> Tensor:
        """The network's logits for `x` as given, in training and eval mode alike."""
        out: Tensor = self.conv1(self.unshuffle(x))
        if self.pool_before_norm:
            out = self.stem_pool(out)
        out = self.bn1(out)
        out = self.relu(out)
        if not self.pool_before_norm:
            out = self.stem_pool(out)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.avgpool(out)
        if self.members == 1:
            logits: Tensor = self.fc(torch.flatten(out, 1))
            return logits
        # (N, members, classes) -> log of the mean probability: valid logits of the ensemble.
        log_p = self.fc(out).flatten(1).float().unflatten(1, (self.members, self.num_classes))
        return torch.logsumexp(log_p.log_softmax(dim=2), dim=1) - math.log(self.members)


class BaselineNet(nn.Module):
    """The pytorch/examples MNIST CNN, layer for layer (1,199,882 parameters at 28x28)."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, image_size: int = IMAGE_SIZE
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        # Two unpadded 3x3 convs take 2 pixels each, the 2x2 max-pool halves: 28 -> 12.
        self.pooled_size = (image_size - 2 - 2) // 2
        self.fc1 = nn.Linear(64 * self.pooled_size * self.pooled_size, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv1(x)
        out = F.relu(out)
        out = self.conv2(out)
        out = F.relu(out)
        out = F.max_pool2d(out, 2)
        out = self.dropout1(out)
        out = torch.flatten(out, 1)
        out = self.fc1(out)
        out = F.relu(out)
        out = self.dropout2(out)
        out = self.fc2(out)
        # Logits, not the original's log_softmax: training uses cross entropy on logits, which
        # fuses the log-softmax in a numerically stable way (and supports label smoothing).
        return out


_BLOCKS: dict[str, Block] = {"plain": PlainBlock, "bottleneck": BottleneckBlock}


def resnet(
    depth: int,
    block: str = "plain",
    *,
    width: float = 1.0,
    shortcut: bool = True,
    zero_init_residual: bool = False,
    in_channels: int = 1,
    num_classes: int = 10,
    stem_pool: bool = False,
    stem_stride: int = 1,
    pool_before_norm: bool = False,
    stem_unshuffle: bool = False,
    tta: str = "none",
    members: int = 1,
) -> ResNet:
    """ResNet of a CIFAR-style depth; raises ConfigError for depths the block cannot reach."""
    n = blocks_per_stage(depth, block)
    return ResNet(
        _BLOCKS[block],
        n,
        width=width,
        shortcut=shortcut,
        zero_init_residual=zero_init_residual,
        in_channels=in_channels,
        num_classes=num_classes,
        stem_pool=stem_pool,
        stem_stride=stem_stride,
        pool_before_norm=pool_before_norm,
        stem_unshuffle=stem_unshuffle,
        views=VIEWS[tta],
        members=members,
    )


# Far above any model worth training on 28x28 images (ResNet-110 has 1.7M), and at 200 MB of
# fp32 weights still safe to allocate on a laptop.
MAX_PARAMETERS = 50_000_000


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model a config describes, on CPU in float32: the caller picks device and dtype.

    Its size is computed from the config first, so a flag or an edited checkpoint asking for a
    huge network is refused before any memory is touched.
    """
    check_size(cfg)
    return _build(cfg)


def check_size(cfg: ModelConfig) -> None:
    """Validate the config and refuse a network over MAX_PARAMETERS, computing, not building."""
    cfg.validate()
    count = conv_weight_count(cfg)
    if count > MAX_PARAMETERS:
        raise ConfigError(
            f"that model would have over {count:,} parameters, more than the limit of "
            f"{MAX_PARAMETERS:,}: lower --width or --depth"
        )


def conv_weight_count(cfg: ModelConfig) -> int:
    """The weights of every conv and of the head, from the config alone (the few BN and bias
    terms per channel left out): a lower bound of the parameter count, exact enough to bound it.
    """
    if cfg.arch == "baseline":
        return 0  # fixed size: the pytorch/examples CNN (1.2M)
    n = blocks_per_stage(cfg.depth, cfg.block)
    expansion = BottleneckBlock.expansion if cfg.block == "bottleneck" else 1
    channels = _scaled(STAGE_WIDTHS[0], cfg.width)
    count = cfg.in_channels * (4 if cfg.stem_unshuffle else 1) * channels * 9
    for base, stride in zip(STAGE_WIDTHS, STAGE_STRIDES, strict=True):
        planes = _scaled(base, cfg.width)
        for i in range(n):
            inputs = channels if i == 0 else planes * expansion
            if expansion == 1:
                count += 9 * inputs * planes + 9 * planes * planes
            else:
                count += inputs * planes + 9 * planes * planes + planes * planes * expansion
            if i == 0 and (stride != 1 or inputs != planes * expansion):
                count += inputs * planes * expansion  # projection shortcut
        channels = planes * expansion
    return (count + channels * cfg.num_classes) * cfg.members


def _build(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "baseline":
        return BaselineNet(cfg.in_channels, cfg.num_classes)
    return resnet(
        cfg.depth,
        cfg.block,
        width=cfg.width,
        shortcut=cfg.shortcut,
        zero_init_residual=cfg.zero_init_residual,
        in_channels=cfg.in_channels,
        num_classes=cfg.num_classes,
        stem_pool=cfg.stem_pool,
        stem_stride=cfg.stem_stride,
        pool_before_norm=cfg.pool_before_norm,
        stem_unshuffle=cfg.stem_unshuffle,
        tta=cfg.tta,
        members=cfg.members,
    )


def stack_members(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The state dict of a ResNet with `members=len(states)` that holds the trained
    one-member ResNets whose state dicts are `states` (all built from one config), in order."""
    keys = set(states[0])
    if any(set(state) != keys for state in states):
        raise ConfigError("ensemble members must be networks of the same shape")
    stacked = {}
    for key in states[0]:
        parts = [state[key] for state in states]
        if key.endswith("num_batches_tracked"):
            # Read only while training, which a packed ensemble never does.
            stacked[key] = parts[0].clone()
        elif key == "fc.weight":
            # Each member's (classes, features) matrix becomes its group of the 1x1 conv.
            stacked[key] = torch.cat([part[:, :, None, None] for part in parts])
        else:
            # Convs, batch norms and biases hold one row per output channel: member after member.
            stacked[key] = torch.cat(parts)
    return stacked


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, batch norm) attribute names where the norm directly follows the conv in forward."""
    if isinstance(module, PlainBlock):
        return [("conv1", "bn1"), ("conv2", "bn2")]
    if isinstance(module, BottleneckBlock):
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    if isinstance(module, ResNet) and not module.pool_before_norm:
        # With the pool between them, BN(pool(conv)) equals pool(BN(conv)) only for positive
        # BN scales, so that stem keeps its norm.
        return [("conv1", "bn1")]
    if (
        isinstance(module, nn.Sequential)
        and len(module) == 2
        and isinstance(module[0], nn.Conv2d)
        and isinstance(module[1], nn.BatchNorm2d)
    ):
        return [("0", "1")]  # a projection shortcut
    return []


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm into the conv before it, in place; for inference only.

    In eval mode a batch norm is a fixed per-channel scale and shift, so the conv can absorb it
    (weights scaled, a bias added) and the extra pass over every activation map disappears
    (benchmarks/fold_batchnorm.py measures the gain; docs/speed.md). The folded model has no
    batch norms to train, and its state_dict no longer matches a checkpoint's: fold a model
    built from one, or `folded_copy` of the one being trained.
    """
    model.eval()
    for module in list(model.modules()):
        for conv_name, bn_name in _conv_bn_pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())
    return model


def folded_copy(model: nn.Module) -> nn.Module:
    """An inference copy of `model` with its batch norms folded; `model` itself is untouched,
    so it may be the one being trained (`train` judges its epochs this way)."""
    return fold_batchnorm(copy.deepcopy(model))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, in_channels: int = 1) -> int:
    """Forward FLOPs for one 28x28 image, as counted by `torch.utils.flop_counter`.

    A multiply-add counts as 2 FLOPs (so this is twice the "MACs" many papers quote), and only
    matmuls and convolutions are counted: BN, ReLU, pooling and bias adds are left out.
    """
    param = next(model.parameters())
    x = torch.zeros(1, in_channels, IMAGE_SIZE, IMAGE_SIZE, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            # One view: a model that averages views at test time runs this once per view.
            model.logits(x) if isinstance(model, ResNet) else model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _downsample(size: int, stride: int) -> int:
    # A 3x3 conv with padding 1 (or a 1x1 conv): ceil(size / stride).
    return (size - 1) // stride + 1


def _shape(*dims: int) -> str:
    return "x".join(str(d) for d in dims)


def describe(cfg: ModelConfig) -> str:
    """One line naming the architecture, e.g. `resnet-20 (plain blocks, shortcuts on)`."""
    if cfg.arch == "baseline":
        return "baseline (pytorch/examples MNIST CNN)"
    shortcuts = "on" if cfg.shortcut else "off"
    width = "" if cfg.width == 1.0 else f", width x{cfg.width:g}"
    stem = ", stride-2 stem" if cfg.stem_stride == 2 else ""
    if cfg.stem_unshuffle:
        stem = ", unshuffled stem"
    if cfg.stem_pool:
        stem += ", pooled stem (pool, then BN)" if cfg.pool_before_norm else ", pooled stem"
    views = len(VIEWS[cfg.tta])
    tta = f", averages {views} views at test time" if views > 1 else ""
    name = f"resnet-{cfg.depth} ({cfg.block} blocks, shortcuts {shortcuts}{width}{stem}{tta})"
    return name if cfg.members == 1 else f"ensemble of {cfg.members} {name}"


def _rows(cfg: ModelConfig, model: nn.Module) -> list[tuple[str, str, int]]:
    """(name, output shape, parameters) per stage, shapes computed from strides."""
    if isinstance(model, BaselineNet):
        s = model.pooled_size
        return [
            ("conv1", _shape(32, IMAGE_SIZE - 2, IMAGE_SIZE - 2), count_parameters(model.conv1)),
            ("conv2+pool", _shape(64, s, s), count_parameters(model.conv2)),
            ("fc1", _shape(128), count_parameters(model.fc1)),
            ("fc2", _shape(cfg.num_classes), count_parameters(model.fc2)),
        ]
    assert isinstance(model, ResNet)
    size = _downsample(IMAGE_SIZE // 2 if cfg.stem_unshuffle else IMAGE_SIZE, cfg.stem_stride)
    stem = count_parameters(model.conv1) + count_parameters(model.bn1)
    rows = [("stem", _shape(model.conv1.out_channels, size, size), stem)]
    if cfg.stem_pool:
        size //= 2
        rows.append(("stem pool", _shape(model.conv1.out_channels, size, size), 0))
    for i, (stage, stride) in enumerate(zip(model.stages, STAGE_STRIDES, strict=True), 1):
        size = _downsample(size, stride)
        channels = _scaled(STAGE_WIDTHS[i - 1], cfg.width) * model.block.expansion * cfg.members
        rows.append((f"layer{i}", _shape(channels, size, size), count_parameters(stage)))
    rows.append(("pool+fc", _shape(cfg.num_classes), count_parameters(model.fc)))
    return rows


def summary(cfg: ModelConfig) -> str:
    """A short human-readable table: architecture, per-stage shapes and params, totals."""
    model = build_model(cfg)
    rows = _rows(cfg, model)
    lines = [
        f"model: {describe(cfg)}",
        f"input: {_shape(cfg.in_channels, IMAGE_SIZE, IMAGE_SIZE)}",
        f"{'stage':<12}{'output':>12}{'params':>12}",
    ]
    lines += [f"{name:<12}{shape:>12}{params:>12,}" for name, shape, params in rows]
    flops = flops_per_image(model, cfg.in_channels)
    lines += [
        f"parameters: {count_parameters(model):,}",
        f"forward FLOPs/image: {flops / 1e6:.1f} M (multiply-add = 2 FLOPs)",
    ]
    views = len(VIEWS[cfg.tta])
    if views > 1:
        lines.append(f"test-time averaging: {views} views per prediction ({views}x those FLOPs)")
    return "\n".join(lines)
