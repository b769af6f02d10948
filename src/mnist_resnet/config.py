"""Frozen configuration dataclasses: the one home of every default and every preset.

Each field is a `setting` (settings.py) that holds its default, its help, its bounds and its
choices: the CLI's flags and the configs' checks are made from them, and the docs and the tests
read defaults from here. Data, model and train make a run, and every checkpoint stores the three
as plain dicts so a model can always be rebuilt from its file alone; the serve, predict, explain
and ensemble configs say how those commands run.

Over 500 lines because it is that one home: every setting with its help, bounds and reason, and
the presets; split, a setting's help would again live apart from its default and its bounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from mnist_resnet.settings import ConfigError as ConfigError
from mnist_resnet.settings import Settings, setting

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


def dataset_argument(text: str) -> str:
    """`--dataset`: a dataset name, or `folder:PATH` / `npz:PATH` with PATH made absolute, so
    that a resume from another folder (or a torchrun rank) reads the same files."""
    own = own_data(text)
    if own is None:
        if text not in DATASET_NAMES:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose {', '.join(DATASET_NAMES)}, folder:PATH or npz:PATH"
            )
        return text
    if not own[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: give a path after '{own[0]}:'")
    return f"{own[0]}:{Path(own[1]).expanduser().absolute()}"


@dataclass(frozen=True)
class DataConfig(Settings):
    dataset: str = setting(
        "mnist",
        f"{', '.join(DATASET_NAMES)}, or your own images: folder:PATH (one sub-folder of images "
        "per class, optional PATH/test/) or npz:PATH (arrays x, y, optional class_names)",
        metavar="DATASET",
        parse=dataset_argument,
    )
    data_dir: str = setting(
        help="data root, torchvision layout",
        factory=default_data_dir,
        shown=f"${DATA_DIR_ENV} or ./data",
    )
    # 5,000 held-out training images select the checkpoint; the test set is read once per run.
    val_size: int = setting(5000, "training images held out for validation", low=0)
    split_seed: int = setting(0, "seed of the validation split")
    augment: bool = setting(True, "disable all augmentation", negative="--no-augment")
    # Random translation by up to `max_shift` pixels: digits are not always centred by
    # centre of mass in real use, and it costs nothing on whole batches.
    max_shift: int = setting(2, "random translation in pixels for augmentation", low=0, high=8)
    # Random rotation up to +/- `rotate` degrees and zoom by up to +/- `scale` (0 = off). Kept
    # small on purpose: a large rotation turns a 6 into a 9.
    rotate: float = setting(
        0.0, "random rotation up to this many degrees (0: off)", low=0.0, high=30.0
    )
    scale: float = setting(
        0.0, "random zoom by up to this fraction, e.g. 0.1 (0: off)", low=0.0, below=0.5
    )
    # Mirror half the training images left to right. For clothes, whose mirror image is another
    # garment of the same class; never for digits and letters, whose mirror image is not one.
    flip: bool = setting(
        False, "mirror half the training images left to right: for clothes, never digits"
    )
    # Cutout: side in pixels of one blanked square per training image (0 = off).
    erase: int = setting(
        0, "Cutout: side of one blanked square per image, pixels (0: off)", low=0, high=28
    )
    # Elastic distortion (Simard et al.): a random displacement field smoothed by a
    # Gaussian of `elastic_sigma` pixels and scaled by `elastic` pixels (0 = off). It bends
    # strokes the way different hands do, which shifts and rotations cannot.
    elastic: float = setting(
        0.0, "elastic distortion strength in pixels, e.g. 34 (0: off)", low=0.0, high=60.0
    )
    elastic_sigma: float = setting(
        4.0, "smoothness of the elastic distortion, pixels", low=1.0, high=10.0
    )
    # Fraction of the training split to use (1.0 = all); small values make fast tests.
    subset: float = setting(1.0, "fraction of the training split to use", above=0.0, high=1.0)
    # Own images only (`folder:`/`npz:` datasets). How a picture becomes 28x28 (PREPROCESS_MODES);
    # saved with the model, so predict and serve prepare an image the way training did.
    preprocess: str = setting(
        "mnist",
        "own image files: mnist (crop to the ink, centre it, as predict does for digits), "
        "fashion (product photos, as Fashion-MNIST was made) or resize (grayscale, whole picture "
        "to 28x28); predict and serve then do the same. Named datasets need none: predict "
        "prepares pictures as each was made (fashion for fashion-mnist, else mnist)",
        choices=PREPROCESS_MODES,
    )
    # Without a test/ folder (or x_test in the .npz), this fraction of each class is held out
    # as the test split, chosen by `split_seed`: about MNIST's 10,000 of 70,000.
    test_fraction: float = setting(
        0.15,
        "own data without a test set: share of each class held out for testing",
        above=0.0,
        below=1.0,
    )

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
        super().validate()


BLOCK_KINDS = ("plain", "bottleneck")
# Limits on what a flag or an edited checkpoint may ask for: far beyond any useful MNIST model
# (the paper's deepest is 1,202 layers at width 1), far below what would exhaust a machine's memory.
MAX_WIDTH = 16.0
MAX_DEPTH = 1202
MAX_CLASSES = 1000
MAX_MEMBERS = 32


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


# Test-time averaging: the views of each image whose class probabilities a model averages when it
# predicts (evaluation, predict, serve, export; never while training). The image as given is
# always the first view. Chosen per recipe on the validation split (docs/results.md).
TTA = {
    "none": "the image as given",
    "shift-x": "the image and its one-pixel shifts left and right (3 views)",
    "shift": "the image and its one-pixel shifts left, right, up and down (5 views)",
    # A mirrored digit is another symbol; a mirrored shoe is a shoe.
    "shift-flip": "those 5 views and their mirror images (10 views; for data whose classes "
    "survive a mirror, trained with --flip)",
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


# The stem's flags of older versions (and keys of their checkpoints), kept as other spellings of
# --stem, with the choice each one names.
LEGACY_STEM_FLAGS = {
    "stem_stride": "--stem-stride 2 is --stem stride2",
    "stem_pool": "--stem pool",
    "pool_before_norm": "with --stem-pool: --stem pool-first",
    "stem_unshuffle": "--stem unshuffle",
}
LEGACY_STEM_KEYS = tuple(LEGACY_STEM_FLAGS)


@dataclass(frozen=True)
class ModelConfig(Settings):
    # "resnet" (He et al., CIFAR-style) or "baseline" (the pytorch/examples MNIST CNN).
    arch: str = setting("resnet", choices=("resnet", "baseline"))
    block: str = setting("plain", "plain or bottleneck", choices=BLOCK_KINDS)
    depth: int = setting(
        20, "network depth: 6n+2 (plain blocks) or 9n+2 (bottleneck)", high=MAX_DEPTH
    )
    width: float = setting(
        1.0, "width multiplier of the 16/32/64 channel stages", above=0.0, high=MAX_WIDTH
    )
    # False gives the paper's "plain net": same layers, no skip connections.
    shortcut: bool = setting(
        True, "remove the skip connections (plain net)", negative="--no-shortcut"
    )
    # Zero-init of each block's last BN gamma makes every block start as identity (Goyal et
    # al.). Off by default: in our short schedules it stalls learning (docs/results.md).
    zero_init_residual: bool = False
    in_channels: int = setting(1, low=1, high=4)
    num_classes: int = setting(10, low=2, high=MAX_CLASSES)
    # What happens to the picture before the first stage: one of STEMS.
    stem: str = setting(
        "conv",
        "what the picture goes through before the first stage: "
        + "; ".join(f"{name}: {text}" for name, text in STEMS.items()),
        choices=STEMS,
    )
    tta: str = setting(
        "none",
        "test-time averaging, the views whose probabilities a prediction averages: "
        + "; ".join(f"{name}: {text}" for name, text in TTA.items()),
        choices=TTA,
    )
    # Several trained networks of this shape averaged in one module (`ensemble --save` packs
    # them); no flag: a model of several members is put together from runs, never trained.
    members: int = setting(1, low=1, high=MAX_MEMBERS)

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
        super().validate()
        if self.arch == "resnet":
            blocks_per_stage(self.depth, self.block)
        elif self.tta != "none":
            raise ConfigError(f"--tta {self.tta} needs a resnet, not the {self.arch} network")
        elif self.members != 1:
            raise ConfigError(f"an ensemble of {self.members} members needs a resnet")


# torch.compile's modes (its own names).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIMIZERS = ("sgd", "adadelta", "muon")
# "step": StepLR, gamma 0.7 each epoch (the pytorch/examples recipe).
SCHEDULES = ("onecycle", "step")


@dataclass(frozen=True)
class TrainConfig(Settings):
    epochs: int = setting(2, "number of epochs to train", low=1)
    batch_size: int = setting(128, "input batch size for training", low=1)
    # Evaluation batch: on a CPU, larger batches run slower once the activations outgrow the
    # cache (docs/speed.md).
    test_batch_size: int = setting(100, "input batch size for validation and test", low=1)
    # Peak learning rate of the one-cycle schedule (SGD, Nesterov momentum).
    lr: float = setting(0.2, "peak learning rate", above=0.0)
    momentum: float = setting(0.9, "SGD momentum", low=0.0, below=1.0)
    nesterov: bool = True
    # Applied to conv and linear weights only: decaying BN and biases hurts (Goyal et al.).
    weight_decay: float = setting(
        5e-4, "weight decay on conv/linear weights (not BN, biases)", low=0.0
    )
    label_smoothing: float = setting(
        0.1, "label smoothing of the cross-entropy loss", low=0.0, below=1.0
    )
    # Linear warmup then cosine decay to zero; warmup keeps the large-batch start stable.
    warmup_epochs: float = setting(0.5, "linear warmup length of the one-cycle schedule", low=0.0)
    optimizer: str = setting(
        "sgd",
        "sgd (Nesterov), muon (Muon on the stages' conv weights, SGD on the rest) or adadelta "
        "(the pytorch/examples recipe)",
        choices=OPTIMIZERS,
    )
    # Muon's update has a fixed size per weight matrix: its rate is not SGD's.
    muon_lr: float = setting(
        0.1, "peak learning rate of Muon's conv weights (--optimizer muon)", above=0.0
    )
    schedule: str = setting(
        "onecycle", "onecycle (warmup + cosine) or step (x0.7 per epoch)", choices=SCHEDULES
    )
    seed: int = setting(1, "random seed")
    log_interval: int = setting(10, "batches between progress-bar updates", low=1)
    save_model: bool = setting(True, "write checkpoints (best.pt and per-epoch files)")
    dry_run: bool = setting(False, "quickly check a single pass: one epoch of one batch")
    accel: bool = setting(True, "use the CPU even when a GPU is available", negative="--no-accel")
    # bf16 autocast: True forces it, False forces fp32, None decides (CUDA with bf16: on; a
    # CPU: on where a cached probe measured it faster, see precision.py; MPS: off). A run saves
    # the decision in its config, so a resumed run keeps the precision it started with.
    amp: bool | None = setting(
        None,
        "force bf16 autocast on (--amp) or off (--no-amp); unset, it is used on CUDA and on "
        "CPUs where a short cached probe measured it faster than fp32",
    )
    channels_last: bool = setting(True, "NHWC memory layout")
    # Keep the whole dataset (uint8) on the training device and cut, augment and step every
    # batch there, reading losses back once per log interval rather than after every step.
    # None decides: yes on a GPU (CUDA, MPS), where each host round trip leaves the device idle;
    # no on a CPU, where there is no round trip to save. A run saves the decision, like `amp`.
    device_data: bool | None = setting(
        None,
        "keep the dataset on the training device and augment there, reading losses every "
        "--log-interval steps; unset, on a GPU yes, on a CPU no",
    )
    compile: bool = setting(False, "torch.compile the model (compile time counts)")
    # torch.compile's mode with --compile: "reduce-overhead" also replays the compiled forward
    # and backward as CUDA graphs. Opt-in: not measured yet (docs/speed.md#gpu-path).
    compile_mode: str = setting(
        "default",
        "with --compile: default, reduce-overhead (CUDA graphs), max-autotune, "
        "max-autotune-no-cudagraphs",
        choices=COMPILE_MODES,
    )
    # Several processes (torchrun): batch statistics over the global batch instead of each
    # rank's share. PyTorch's SyncBatchNorm runs on GPUs only.
    sync_bn: bool = setting(False, "with several processes: BatchNorm over the global batch (CUDA)")
    deterministic: bool = setting(False, "deterministic algorithms, for bit-exact repeats")
    threads: int = setting(0, "CPU threads (0: one per available core)", low=0)
    # Stop when validation error has not improved for this many epochs (0 = never).
    patience: int = setting(
        0, "stop after this many epochs without validation gain (0: off)", low=0
    )
    eval_test_every_epoch: bool = setting(False, "also report test metrics every epoch")
    grad_clip: float = setting(0.0, "clip the gradient norm to this value (0: off)", low=0.0)
    # Exponential moving average of the weights (0 = off). When on, the averaged weights are
    # the ones validated, selected and saved to best.pt. The decay ramps up as (1+n)/(10+n)
    # after n steps and only reaches `ema_decay` after about 9 / (1 - ema_decay) steps: 9,000
    # for 0.999, more than the `best` recipe's 6,435 steps, which therefore ends at 0.9986 and
    # gives the same weights with 0.9995.
    ema_decay: float = setting(
        0.0,
        "average the weights with this decay, e.g. 0.999, reached after ~9/(1-DECAY) steps "
        "(0: off)",
        low=0.0,
        below=1.0,
    )
    skip_nonfinite: bool = setting(False, "skip steps whose loss is NaN/inf instead of stopping")
    # Knowledge distillation (distill.py): checkpoints of the same dataset whose averaged
    # answers at `distill_temperature` the network also learns from, with `distill_weight` of
    # the loss (the rest is the cross-entropy with the labels). 0.9 and 4 are the usual pair
    # for one network learning from stronger ones (Hinton et al.'s distillation paper; the
    # distillation baselines of Tian et al.'s CRD).
    # Paths are made absolute so that a resumed run finds them from any folder.
    teachers: tuple[str, ...] = setting(
        (),
        "a checkpoint to learn from besides the labels; repeat for an ensemble of teachers",
        flag="--teacher",
        repeat=True,
        metavar="CKPT",
        parse=lambda text: str(Path(text).expanduser().absolute()),
    )
    distill_weight: float = setting(
        0.9, "with --teacher: the teachers' share of the loss", low=0.0, high=1.0
    )
    distill_temperature: float = setting(
        4.0,
        "with --teacher: the temperature that softens teachers' and student's answers",
        above=0.0,
        high=100.0,
    )
    keep_last: int = setting(2, "epoch checkpoints to keep besides best.pt", low=1)
    checkpoint_steps: int = setting(
        0, "also checkpoint every N steps (0: only at epoch ends and on Ctrl-C)", low=0
    )
    runs_dir: str = setting("runs", "folder that holds run directories")
    name: str = setting("", "run directory name", shown="<preset>-<dataset>-s<seed>-<time>")

    def validate(self) -> None:
        super().validate()
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
    # With SGD three epochs were ahead of two on validation, and level with 12 epochs of the
    # `fast` network, which cost about the same on these CPUs; Muon on the stages' conv weights
    # fits in two epochs what SGD fits in three (docs/results.md, "Muon for the default").
    # Shifts of at most one pixel and weight decay 1e-3, as in `fast`, and predictions that
    # average the image and its four one-pixel shifts: each chosen on the validation split.
    "resnet14": Preset(
        "ResNet-14, plain blocks (0.17M params), Muon + SGD, 2 epochs, 1-px shifts, weight decay "
        "1e-3, 5-view test-time averaging: the default",
        ModelConfig(depth=14, tta="shift"),
        TrainConfig(epochs=2, weight_decay=1e-3, optimizer="muon"),
        DataConfig(max_shift=1),
    ),
    "resnet20": Preset("ResNet-20, plain blocks (0.27M params)", ModelConfig(depth=20)),
    # Speed recipe: the stem's 2x2 max-pool makes every stage 4x cheaper, and pooling before
    # the stem's batch norm spares it the 28x28 map (docs/speed.md). In the same time a
    # shallower net trained longer, at a higher peak rate, fits MNIST better than ResNet-14;
    # shifts of at most one pixel and twice the weight decay fit it better still. Muon on the
    # stages' conv weights reaches in two epochs the validation error SGD reaches in three, at
    # a fifth more time per step. Its predictions average the image and its one-pixel shifts
    # left and right: the cheapest view set that helps. Each choice made on the validation
    # split over seeds (docs/results.md).
    "fast": Preset(
        "ResNet-8 with a pooled stem, Muon + SGD, batch 256, 2 epochs, 1-px shifts, 3-view "
        "test-time averaging: the speed recipe",
        ModelConfig(depth=8, stem="pool-first", tta="shift-x"),
        TrainConfig(
            epochs=2, batch_size=256, lr=0.8, weight_decay=1e-3, optimizer="muon", muon_lr=0.1
        ),
        DataConfig(max_shift=1),
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
    # rate with it (the linear scaling rule, as for several processes: Goyal et al.);
    # validation and test run in batches of 5,000 and the losses are read every 50 steps. They
    # run on a CPU too, but were not tuned there; nor, yet, measured on a GPU. `fast-gpu` scales
    # the ResNet-14 recipe `fast` was before its ResNet-8 (lr 0.4 at batch 256).
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


def port_number(text: str) -> int:
    """`--port`: refused as the flag is read, with the usage line."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


@dataclass(frozen=True)
class ServeConfig(Settings):
    """How `serve` runs: the server process(es), the micro-batcher and the timeouts."""

    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(8000, "port", low=1, high=65535, parse=port_number)
    # Server processes, each with its own copy of the model (a few MB): one per core uses every
    # core for decoding and inference (docs/serving.md).
    workers: int = setting(
        1, "server processes, each with its own model; one per core uses them all", low=1
    )
    # Intra-op threads of each worker's model calls.
    threads: int = setting(1, "inference threads per worker", low=1)
    # Micro-batching: images per model call, and how long the first request of a batch may
    # wait for others (an idle server answers at most this much later).
    max_batch: int = setting(
        64, "images per model call when requests are batched together", low=1, high=1024
    )
    max_delay_ms: float = setting(
        2.0, "longest wait of a request for others to batch with", low=0.0, high=1000.0
    )
    # auto: ONNX Runtime when it is installed (faster for small batches), else the folded
    # PyTorch model.
    engine: str = setting(
        "auto", "auto: ONNX Runtime when installed, else PyTorch", choices=SERVE_ENGINES
    )
    # A client must send a request's headers within this time and its body without pausing
    # longer than this, or its connection is closed: idle and slow connections cannot pile up.
    header_timeout_s: float = setting(
        10.0,
        "close connections that have not sent a request's headers by then",
        flag="--header-timeout",
        metavar="SECONDS",
        low=0.001,
        high=60.0,
    )
    body_timeout_s: float = setting(
        10.0,
        "408 when an upload pauses longer than this",
        flag="--body-timeout",
        metavar="SECONDS",
        above=0.0,
        high=3600.0,
    )
    # A body not complete by then gets 408, and a request whose body is in but is not answered
    # by then gets 503, instead of holding its connection.
    request_timeout_s: float = setting(
        30.0,
        "408 for an upload not complete by then, 503 for a request not answered by then once "
        "its upload is in",
        flag="--request-timeout",
        metavar="SECONDS",
        above=0.0,
        high=3600.0,
    )
    # Requests preparing their images at once per worker; more wait with their bodies read.
    # Bodies are read first, outside this limit (a slow upload holds no place), within a byte
    # budget of this many 5 MB bodies per worker (503 beyond it). Prepared images then wait
    # for the batcher without this limit.
    max_concurrency: int = setting(
        32,
        "requests preparing their images at once per worker; more wait with their uploads "
        "read, which hold at most this many 5 MB bodies",
        low=1,
    )
    # Connections served at once per worker, idle ones included (Granian's backpressure): far
    # above what clients need, since the header timeout frees the slots of silent ones.
    max_connections: int = setting(
        1024, "connections served at once per worker, idle ones included", low=1
    )
    # Host names answered besides the localhost names (DNS-rebinding protection).
    allowed_hosts: tuple[str, ...] = setting(
        (),
        "also answer requests for this Host name (repeatable; localhost names always); "
        "needed when the server is reached by a name or address other than localhost",
        flag="--allowed-host",
        metavar="NAME",
        repeat=True,
    )


@dataclass(frozen=True)
class PredictConfig(Settings):
    """How `predict` answers: classes shown, the format, the prepared images kept."""

    top_k: int = setting(3, "classes to show", low=1)
    json: bool = setting(False, "print JSON instead of text")
    save_preprocessed: Path | None = setting(
        None, "write the 28x28 images the model saw to DIR", metavar="DIR"
    )


@dataclass(frozen=True)
class ExplainConfig(Settings):
    """Where `explain` draws its figures, and how finely it integrates."""

    out: Path = setting(Path("explained"), "folder for the figures", metavar="DIR")
    # Integration steps (Gauss-Legendre quadrature, Captum's default). A ReLU network's path
    # integral converges slowly: the gap between the attributions' sum and the logit's change
    # shrinks about 2x per doubling of the steps (docs/degradation.md#what-the-network-looks-at).
    steps: int = setting(64, "integration steps of the integrated gradients", low=2, high=1024)
    json: bool = setting(False, "print the numbers as JSON")


@dataclass(frozen=True)
class EnsembleConfig(Settings):
    """Which split `ensemble` reports on, with which views and members."""

    split: str = setting(
        "test",
        "test, or the validation images the checkpoints held out",
        choices=("test", "validation"),
    )
    tta: bool = setting(
        False,
        "also average over one-pixel shifts of each image (and their mirror images, for "
        "models trained with --flip)",
    )
    select: int = setting(
        0,
        "first choose up to N of the checkpoints on the validation split (greedy forward "
        "selection by validation errors), then report the chosen ensemble (0: use all)",
        metavar="N",
        low=0,
    )
    json: Path | None = setting(None, "also write results here", metavar="FILE")
    save: Path | None = setting(
        None,
        "also write the ensemble as one model file (.pt or .safetensors) that averages its "
        "members, for evaluate, predict, serve and export",
        metavar="FILE",
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
    shaped: dict[str, Any] = _json_shaped(dataclasses.asdict(cfg))
    return shaped


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
