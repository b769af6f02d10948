"""Frozen configuration dataclasses: the one home of every default and every preset.

The CLI, the docs and the tests read defaults from here; every checkpoint stores the three
configs as plain dicts so a model can always be rebuilt from its file alone.

Over 500 lines because it is that one home: every setting with its reason, the presets, and
each config's checks of its values; split, a default would again live apart from its check.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from mnist_resnet.errors import UserError

DATA_DIR_ENV = "MNIST_RESNET_DATA"
DATASET_NAMES = ("mnist", "fashion-mnist", "kmnist")
# A user's own images: `folder:PATH` (one sub-folder per class) or `npz:PATH` (arrays x, y).
OWN_DATA_KINDS = ("folder", "npz")
# How an image file becomes a 28x28 input, in training on a folder and in predict/serve:
# "mnist" is predict's MNIST-style preprocessing (ink polarity, crop, 20 px box, centred by
# mass); "fashion" is how Fashion-MNIST was made from product photos (background trimmed,
# longest edge 28 px, sharpened, centred by box, negated); "resize" is grayscale and a plain
# resize of the whole picture to 28x28. What each expects, for model cards and --help:
PREPROCESS_INPUTS = {
    "mnist": "one handwritten or drawn character, any size, colour or polarity; cropped to its "
    "ink, longer side 20 px, centred by mass in 28x28, white on black",
    "fashion": "a photo of one product on a plain background, as Fashion-MNIST was made from "
    "shop photos: background trimmed, longest edge 28 px, sharpened, centred by box, negated",
    "resize": "a picture already framed as the model should see it: grayscale, resized to 28x28",
}
PREPROCESS_MODES = tuple(PREPROCESS_INPUTS)
# A named dataset's images were made one way; a model trained on it expects pictures made so.
DATASET_PREPROCESS = {"mnist": "mnist", "fashion-mnist": "fashion", "kmnist": "mnist"}


class ConfigError(UserError, ValueError):
    """A configuration value a user chose is invalid; the message says which and why."""


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV) or "data"


def own_data(dataset: str) -> tuple[str, str] | None:
    """(kind, path) of a `folder:PATH` or `npz:PATH` dataset; None for a named dataset."""
    kind, sep, path = dataset.partition(":")
    return (kind, path) if sep and kind in OWN_DATA_KINDS else None


def dataset_label(dataset: str) -> str:
    """A name for a dataset that fits in a file name: `folder-shapes` for `folder:/x/shapes`."""
    own = own_data(dataset)
    if own is None:
        return dataset
    # At most 64 characters of it: the run folder's name holds it, and a name over 255 bytes
    # cannot be created.
    stem = (Path(own[1]).stem or "data")[:64]
    return f"{own[0]}-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)}"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    data_dir: str = field(default_factory=default_data_dir)
    # 5,000 held-out training images select the checkpoint; the test set is read once per run.
    val_size: int = 5000
    split_seed: int = 0
    # Random translation by up to `max_shift` pixels: digits are not always centred by
    # centre of mass in real use, and it costs nothing on whole batches.
    augment: bool = True
    max_shift: int = 2
    # Random rotation up to +/- `rotate` degrees and zoom by up to +/- `scale` (0 = off). Kept
    # small on purpose: a large rotation turns a 6 into a 9.
    rotate: float = 0.0
    scale: float = 0.0
    # Mirror half the training images left to right. For clothes, whose mirror image is another
    # garment of the same class; never for digits and letters, whose mirror image is not one.
    flip: bool = False
    # Cutout: side in pixels of one blanked square per training image (0 = off).
    erase: int = 0
    # Elastic distortion (Simard et al. 2003): a random displacement field smoothed by a
    # Gaussian of `elastic_sigma` pixels and scaled by `elastic` pixels (0 = off). It bends
    # strokes the way different hands do, which shifts and rotations cannot.
    elastic: float = 0.0
    elastic_sigma: float = 4.0
    # Fraction of the training split to use (1.0 = all); small values make fast tests.
    subset: float = 1.0
    # Own images only (`folder:`/`npz:` datasets). How a picture becomes 28x28 (PREPROCESS_MODES);
    # saved with the model, so predict and serve prepare an image the way training did.
    preprocess: str = "mnist"
    # Without a test/ folder (or x_test in the .npz), this fraction of each class is held out
    # as the test split, chosen by `split_seed`: about MNIST's 10,000 of 70,000.
    test_fraction: float = 0.15

    @property
    def preparation(self) -> str:
        """How predict and serve turn a picture into this model's input: own data the way it
        was trained (`preprocess`), a named dataset the way its images were made (for those,
        `preprocess` plays no part in training, and older checkpoints saved "mnist" for all)."""
        if own_data(self.dataset) is not None:
            return self.preprocess
        return DATASET_PREPROCESS.get(self.dataset, self.preprocess)

    def validate(self) -> None:
        own = own_data(self.dataset)
        if own is None and self.dataset not in DATASET_NAMES:
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_NAMES)}, "
                "folder:PATH (one sub-folder of images per class) or npz:PATH"
            )
        if own is not None and not own[1]:
            raise ConfigError(f"--dataset {self.dataset}: give the path after '{own[0]}:'")
        if self.preprocess not in PREPROCESS_MODES:
            raise ConfigError(
                f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}, "
                f"got {self.preprocess!r}"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.val_size < 0:
            raise ConfigError(f"--val-size must be >= 0, got {self.val_size}")
        if not 0 <= self.max_shift <= 8:
            raise ConfigError(f"--max-shift must be between 0 and 8 pixels, got {self.max_shift}")
        if not 0.0 <= self.rotate <= 30.0:
            raise ConfigError(f"--rotate must be between 0 and 30 degrees, got {self.rotate}")
        if not 0.0 <= self.scale < 0.5:
            raise ConfigError(f"--scale must be in [0, 0.5), got {self.scale}")
        if not 0 <= self.erase <= 28:
            raise ConfigError(f"--erase must be between 0 and 28 pixels, got {self.erase}")
        if not 0.0 <= self.elastic <= 60.0:
            raise ConfigError(f"--elastic must be between 0 and 60 pixels, got {self.elastic}")
        if not 1.0 <= self.elastic_sigma <= 10.0:
            raise ConfigError(
                f"--elastic-sigma must be between 1 and 10 pixels, got {self.elastic_sigma}"
            )
        if not 0.0 < self.subset <= 1.0:
            raise ConfigError(f"--subset must be in (0, 1], got {self.subset}")


BLOCK_KINDS = ("plain", "bottleneck")
# Limits on what a flag or an edited checkpoint may ask for: far beyond any useful MNIST model
# (the paper's deepest is 1202 layers at width 1), far below what would exhaust a machine's memory.
MAX_WIDTH = 16.0
MAX_DEPTH = 1202
MAX_CLASSES = 1000


def blocks_per_stage(depth: int, block: str = "plain") -> int:
    """Blocks per stage for a CIFAR-style depth: 6n+2 for plain blocks, 9n+2 for bottlenecks."""
    if block not in BLOCK_KINDS:
        raise ConfigError(f"unknown block {block!r}; choose plain or bottleneck")
    # Stem conv + fc count as 2 layers; each of the 3 stages holds n blocks of 2 or 3 convs.
    layers_per_block_row = 3 * (2 if block == "plain" else 3)
    if depth < 2 + layers_per_block_row or (depth - 2) % layers_per_block_row:
        rule = "6n+2 (20, 32, 44, 56, 110)" if block == "plain" else "9n+2 (20, 29, 38, 56, 110)"
        raise ConfigError(f"depth {depth} is not valid for {block} blocks: use {rule}")
    return (depth - 2) // layers_per_block_row


# The stem: what the 28x28 picture goes through before the first stage. All but "conv" give every
# stage a quarter of the pixels (4x fewer FLOPs) for speed recipes (docs/speed.md):
STEMS = {
    "conv": "a 3x3 stride-1 conv, BN, ReLU (the paper's CIFAR stem)",
    # The speed recipe's.
    "pool": "conv, BN, ReLU, then a 2x2 max-pool",
    # BN and ReLU (and their backward passes) run on 14x14 instead of 28x28 maps. Max-pool
    # commutes with ReLU and with BN's per-channel affine map when gamma > 0; only BN's batch
    # statistics differ.
    "pool-first": "conv, 2x2 max-pool, then BN and ReLU on the pooled maps",
    # Unlike the pool it never computes, normalises or stores the full 28x28 map: the pooled
    # stem spent a quarter of each training step on that map (torch.profiler, fast network,
    # batch 256).
    "stride2": "a 3x3 conv of stride 2",
    # Pixel unshuffle ("space to depth"): no 28x28 map is ever built, and each stem output sees
    # a 6x6 patch of the image (a stride-2 3x3 conv: 3x3), with nothing discarded by a pool.
    "unshuffle": "each 2x2 block of pixels to 4 channels, then a 3x3 stride-1 conv",
}


def stem_from_flags(
    stem_pool: bool = False,
    pool_before_norm: bool = False,
    stem_stride: int = 1,
    stem_unshuffle: bool = False,
) -> str:
    """The stem that the four flags of older versions (and their checkpoints) described."""
    if stem_stride not in (1, 2):
        raise ConfigError(f"--stem-stride must be 1 or 2, got {stem_stride}")
    if pool_before_norm and not stem_pool:
        raise ConfigError("--pool-before-norm only applies with --stem-pool")
    if stem_unshuffle and (stem_pool or stem_stride != 1):
        raise ConfigError(
            "--stem-unshuffle already quarters the pixels: drop --stem-pool / --stem-stride 2"
        )
    if stem_pool and stem_stride == 2:
        # Older versions built this too: a stride-2 conv, then the pool (every stage 7x7).
        raise ConfigError("--stem-pool with --stem-stride 2 is not one of the stems; choose one")
    if stem_unshuffle:
        return "unshuffle"
    if stem_stride == 2:
        return "stride2"
    if stem_pool:
        return "pool-first" if pool_before_norm else "pool"
    return "conv"


LEGACY_STEM_KEYS = ("stem_pool", "pool_before_norm", "stem_stride", "stem_unshuffle")


@dataclass(frozen=True)
class ModelConfig:
    # "resnet" (He et al. 2015, CIFAR-style) or "baseline" (the pytorch/examples MNIST CNN).
    arch: str = "resnet"
    block: str = "plain"
    depth: int = 20
    width: float = 1.0
    # False gives the paper's "plain net": same layers, no skip connections.
    shortcut: bool = True
    # Zero-init of each block's last BN gamma makes every block start as identity (Goyal et al.
    # 2017). Off by default: in our short schedules it stalls learning (docs/results.md).
    zero_init_residual: bool = False
    in_channels: int = 1
    num_classes: int = 10
    # What happens to the picture before the first stage: one of STEMS.
    stem: str = "conv"

    # The stem's parts, as the network builder reads them.
    @property
    def stem_pool(self) -> bool:
        return self.stem in ("pool", "pool-first")

    @property
    def pool_before_norm(self) -> bool:
        return self.stem == "pool-first"

    @property
    def stem_stride(self) -> int:
        return 2 if self.stem == "stride2" else 1

    @property
    def stem_unshuffle(self) -> bool:
        return self.stem == "unshuffle"

    def validate(self) -> None:
        if self.arch not in ("resnet", "baseline"):
            raise ConfigError(f"unknown architecture {self.arch!r}; choose resnet or baseline")
        if self.arch == "resnet":
            blocks_per_stage(self.depth, self.block)
        if not 0 < self.width <= MAX_WIDTH:
            raise ConfigError(f"--width must be in (0, {MAX_WIDTH:g}], got {self.width}")
        if self.depth > MAX_DEPTH:
            raise ConfigError(f"--depth must be at most {MAX_DEPTH}, got {self.depth}")
        if self.stem not in STEMS:
            raise ConfigError(f"unknown stem {self.stem!r}; choose one of {', '.join(STEMS)}")
        if not 1 <= self.in_channels <= 4 or not 2 <= self.num_classes <= MAX_CLASSES:
            raise ConfigError(
                f"in_channels must be 1-4 and num_classes 2-{MAX_CLASSES}, got "
                f"{self.in_channels} and {self.num_classes}"
            )


# torch.compile's modes (its own names).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    # Evaluation batch: on a CPU, larger batches run slower once the activations outgrow the
    # cache (docs/speed.md).
    test_batch_size: int = 100
    # Peak learning rate of the one-cycle schedule (SGD, Nesterov momentum).
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    # Applied to conv and linear weights only: decaying BN and biases hurts (Goyal et al. 2017).
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    # Linear warmup then cosine decay to zero; warmup keeps the large-batch start stable.
    warmup_epochs: float = 0.5
    optimizer: str = "sgd"  # "sgd" or "adadelta" (the pytorch/examples recipe)
    schedule: str = "onecycle"  # "onecycle" or "step" (StepLR gamma 0.7 each epoch)
    seed: int = 1
    log_interval: int = 10
    save_model: bool = True
    dry_run: bool = False
    accel: bool = True
    # bf16 autocast: True forces it, False forces fp32, None decides (CUDA with bf16: on; a
    # CPU: on where a cached probe measured it faster, see precision.py; MPS: off). A run saves
    # the decision in its config, so a resumed run keeps the precision it started with.
    amp: bool | None = None
    channels_last: bool = True
    # Keep the whole dataset (uint8) on the training device and cut, augment and step every
    # batch there, reading losses back once per log interval rather than after every step.
    # None decides: yes on a GPU (CUDA, MPS), where each host round trip leaves the device idle;
    # no on a CPU, where there is no round trip to save. A run saves the decision, like `amp`.
    device_data: bool | None = None
    compile: bool = False
    # torch.compile's mode with --compile: "reduce-overhead" also replays the compiled forward
    # and backward as CUDA graphs. Opt-in: not measured yet (docs/speed.md#gpu-path).
    compile_mode: str = "default"
    # Several processes (torchrun): batch statistics over the global batch instead of each
    # rank's share. PyTorch's SyncBatchNorm runs on GPUs only.
    sync_bn: bool = False
    deterministic: bool = False
    threads: int = 0  # 0 = one per physical core
    # Stop when validation error has not improved for this many epochs (0 = never).
    patience: int = 0
    eval_test_every_epoch: bool = False
    grad_clip: float = 0.0
    # Exponential moving average of the weights (0 = off). When on, the averaged weights are
    # the ones validated, selected and saved to best.pt. The decay ramps up as (1+n)/(10+n)
    # after n steps and only reaches `ema_decay` after about 9 / (1 - ema_decay) steps: 9,000
    # for 0.999, more than the `best` recipe's 6,435 steps, which therefore ends at 0.9986 and
    # gives the same weights with 0.9995.
    ema_decay: float = 0.0
    # Skip (instead of stopping at) a step whose loss is NaN or infinite.
    skip_nonfinite: bool = False
    # Knowledge distillation (distill.py): checkpoints of the same dataset whose averaged
    # answers at `distill_temperature` the network also learns from, with `distill_weight` of
    # the loss (the rest is the cross-entropy with the labels). 0.9 and 4 are the usual pair
    # for one network learning from stronger ones (Hinton et al. 2015; Tian et al. 2020).
    teachers: tuple[str, ...] = ()
    distill_weight: float = 0.9
    distill_temperature: float = 4.0
    keep_last: int = 2
    # Also write a mid-epoch checkpoint every N steps (0: only at epoch ends and on Ctrl-C).
    checkpoint_steps: int = 0
    runs_dir: str = "runs"
    name: str = ""

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.test_batch_size < 1:
            raise ConfigError("--batch-size and --test-batch-size must be >= 1")
        for flag, value in (
            ("--lr", self.lr),
            ("--weight-decay", self.weight_decay),
            ("--warmup-epochs", self.warmup_epochs),
            ("--grad-clip", self.grad_clip),
        ):
            if not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            raise ConfigError("--weight-decay, --warmup-epochs and --grad-clip must be >= 0")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"unknown --compile-mode {self.compile_mode!r}; choose one of "
                f"{', '.join(COMPILE_MODES)}"
            )
        if self.optimizer not in ("sgd", "adadelta"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose sgd or adadelta")
        if self.schedule not in ("onecycle", "step"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose onecycle or step")
        if self.threads < 0 or self.patience < 0 or self.checkpoint_steps < 0:
            raise ConfigError("--threads, --patience and --checkpoint-steps must be >= 0")
        if self.log_interval < 1 or self.keep_last < 1:
            raise ConfigError("--log-interval and --keep-last must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ConfigError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        if not 0.0 < self.distill_temperature <= 100.0:
            raise ConfigError(
                f"--distill-temperature must be in (0, 100], got {self.distill_temperature}"
            )
        if len(self.teachers) > 16:
            raise ConfigError(f"--teacher given {len(self.teachers)} times; at most 16")
        if self.name and (Path(self.name).name != self.name or self.name in (".", "..")):
            raise ConfigError(f"--name {self.name!r} must be a plain folder name, not a path")


@dataclass(frozen=True)
class Preset:
    description: str
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    data: DataConfig | None = None


# The default recipe (`make train`): the depth and epochs that validated best for their time
# on a 2-core CPU among the candidates of docs/results.md.
DEFAULT_PRESET = "resnet14"

PRESETS: dict[str, Preset] = {
    "resnet14": Preset(
        "ResNet-14, plain blocks (0.17M params): the fast default", ModelConfig(depth=14)
    ),
    "resnet20": Preset("ResNet-20, plain blocks (0.27M params)", ModelConfig(depth=20)),
    # Speed recipe: the stem's 2x2 max-pool makes every stage 4x cheaper (docs/speed.md).
    "fast": Preset(
        "ResNet-14 with a pooled stem, batch 256, 2 epochs: the speed recipe",
        ModelConfig(depth=14, stem="pool"),
        TrainConfig(batch_size=256, lr=0.4),
    ),
    # Accuracy recipe: the default network trained 7.5x longer on digits that are also slightly
    # rotated and zoomed, judged and selected by the EMA of its weights on the validation split
    # (docs/results.md).
    "best": Preset(
        "ResNet-14, 15 epochs, shift/rotate/zoom augmentation, weight EMA: the accuracy recipe",
        ModelConfig(depth=14),
        TrainConfig(epochs=15, ema_decay=0.999),
        DataConfig(rotate=10.0, scale=0.1),
    ),
    # The GPU forms of `fast` and `best` (docs/speed.md#gpu-path). A GPU step of these small
    # networks costs launch overhead more than FLOPs, so the batch grows and the SGD learning
    # rate with it (the linear scaling rule, as for several processes: Goyal et al. 2017);
    # validation and test run in batches of 5,000 and the losses are read every 50 steps. They
    # run on a CPU too, but were not tuned there; nor, yet, measured on a GPU.
    "fast-gpu": Preset(
        "fast for a GPU: ResNet-14 with a pooled stem, batch 512, lr 0.8, 3 epochs",
        ModelConfig(depth=14, stem="pool"),
        TrainConfig(epochs=3, batch_size=512, lr=0.8, test_batch_size=5000, log_interval=50),
    ),
    "best-gpu": Preset(
        "best for a GPU: ResNet-20, 30 epochs, batch 256, lr 0.4, shift/rotate/zoom, weight EMA",
        ModelConfig(depth=20),
        TrainConfig(
            epochs=30,
            batch_size=256,
            lr=0.4,
            ema_decay=0.999,
            test_batch_size=5000,
            log_interval=50,
        ),
        DataConfig(rotate=10.0, scale=0.1),
    ),
    "resnet32": Preset("ResNet-32, plain blocks", ModelConfig(depth=32)),
    "resnet56": Preset("ResNet-56, plain blocks", ModelConfig(depth=56)),
    "resnet110": Preset("ResNet-110, plain blocks", ModelConfig(depth=110)),
    "resnet29-bottleneck": Preset(
        "ResNet-29, bottleneck blocks (expansion 4)", ModelConfig(block="bottleneck", depth=29)
    ),
    "plain20": Preset(
        "20 layers without shortcuts (the paper's plain net)",
        ModelConfig(depth=20, shortcut=False),
    ),
    "plain56": Preset(
        "56 layers without shortcuts (the paper's plain net)",
        ModelConfig(depth=56, shortcut=False),
    ),
    "baseline": Preset(
        "the pytorch/examples MNIST CNN with its recipe (Adadelta lr 1.0, StepLR 0.7, batch 64)",
        ModelConfig(arch="baseline"),
        TrainConfig(
            epochs=14,
            batch_size=64,
            lr=1.0,
            optimizer="adadelta",
            schedule="step",
            weight_decay=0.0,
            label_smoothing=0.0,
            warmup_epochs=0.0,
            amp=False,
            channels_last=False,
        ),
        DataConfig(augment=False, val_size=0),
    ),
}


SERVE_ENGINES = ("auto", "onnx", "torch")


@dataclass(frozen=True)
class ServeConfig:
    """How `serve` runs: the server process(es), the micro-batcher and the timeouts."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Server processes, each with its own copy of the model (a few MB): one per core uses every
    # core for decoding and inference (docs/serving.md).
    workers: int = 1
    # Intra-op threads of each worker's model calls.
    threads: int = 1
    # Micro-batching: images per model call, and how long the first request of a batch may
    # wait for others (an idle server answers at most this much later).
    max_batch: int = 64
    max_delay_ms: float = 2.0
    # auto: ONNX Runtime when it is installed (faster for small batches), else the folded
    # PyTorch model.
    engine: str = "auto"
    # A client must send a request's headers within this time and its body without pausing
    # longer than this, or its connection is closed: idle and slow connections cannot pile up.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    # A body not complete by then gets 408, and a request whose body is in but is not answered
    # by then gets 503, instead of holding its connection.
    request_timeout_s: float = 30.0
    # Requests preparing their images at once per worker; more wait with their bodies read.
    # Bodies are read first, outside this limit (a slow upload holds no place), within a byte
    # budget of this many 5 MB bodies per worker (503 beyond it). Prepared images then wait
    # for the batcher without this limit.
    max_concurrency: int = 32
    # Connections served at once per worker, idle ones included (Granian's backpressure): far
    # above what clients need, since the header timeout frees the slots of silent ones.
    max_connections: int = 1024
    # Host names answered besides the localhost names (DNS-rebinding protection).
    allowed_hosts: tuple[str, ...] = ()

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        counts = (self.workers, self.threads, self.max_concurrency, self.max_connections)
        if min(counts) < 1:
            raise ConfigError(
                "--workers, --threads, --max-concurrency and --max-connections must be >= 1"
            )
        if not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"--max-batch must be in 1..1024, got {self.max_batch}")
        for flag, value, top in (
            ("--max-delay-ms", self.max_delay_ms, 1000.0),
            ("--header-timeout", self.header_timeout_s, 60.0),
            ("--body-timeout", self.body_timeout_s, 3600.0),
            ("--request-timeout", self.request_timeout_s, 3600.0),
        ):
            if not math.isfinite(value) or not 0.0 <= value <= top:
                raise ConfigError(f"{flag} must be a number in [0, {top:g}], got {value}")
        if self.header_timeout_s < 0.001 or self.body_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ConfigError("--header-timeout, --body-timeout and --request-timeout must be > 0")
        if self.engine not in SERVE_ENGINES:
            raise ConfigError(
                f"unknown engine {self.engine!r}; choose one of {', '.join(SERVE_ENGINES)}"
            )


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as JSON would give it back (tuples as lists), so a checkpoint's copy and its
    config.json compare equal."""
    return _json_shaped(dataclasses.asdict(cfg))


def _json_shaped(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_shaped(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_json_shaped(v) for v in value]
    return value


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "bool | None": (bool, type(None)),
    "tuple[str, ...]": (list, tuple),
}


def from_dict(cls: type[T], values: object) -> T:
    """Rebuild a config from a checkpoint or config.json, ignoring keys a newer or older version
    added, and refusing values of the wrong type (the file may have been edited)."""
    if not isinstance(values, dict):
        raise ConfigError(
            f"{cls.__name__}: expected a mapping of settings, got {type(values).__name__}"
        )
    if cls is ModelConfig and "stem" not in values:
        values = _stem_of_old_config(values)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in values:
            continue
        value, allowed = values[f.name], _FIELD_TYPES.get(str(f.type), (object,))
        # bool is an int in Python; a flag is never a count, and a count never a flag.
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            raise ConfigError(f"{cls.__name__}.{f.name}: expected {f.type}, got {value!r:.40}")
        if str(f.type) == "tuple[str, ...]":
            items = cast(list[object], value)
            if not all(isinstance(v, str) for v in items):
                raise ConfigError(f"{cls.__name__}.{f.name}: expected strings, got {value!r:.40}")
            value = tuple(items)
        kwargs[f.name] = float(cast(float, value)) if str(f.type) == "float" else value
    return cls(**kwargs)


def _stem_of_old_config(values: dict[str, Any]) -> dict[str, Any]:
    """A model config saved before `stem` was one choice: its four flags become that choice."""
    flags = {k: values[k] for k in LEGACY_STEM_KEYS if k in values}
    for key, value in flags.items():
        allowed = int if key == "stem_stride" else bool
        if not isinstance(value, allowed) or (allowed is int and isinstance(value, bool)):
            raise ConfigError(f"ModelConfig.{key}: expected {allowed.__name__}, got {value!r:.40}")
    return {**values, "stem": stem_from_flags(**flags)}
