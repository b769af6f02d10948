"""Command line: turns argv into configs and calls the library; nothing else lives here.

Over 500 lines only because it declares every subcommand's flags with their help; each
command itself is a few lines that call the library.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnist_resnet import __version__
from mnist_resnet.config import (
    DATASET_NAMES,
    DEFAULT_PRESET,
    PRESETS,
    SERVE_ENGINES,
    STEMS,
    ConfigError,
    DataConfig,
    ModelConfig,
    ServeConfig,
    TrainConfig,
    default_data_dir,
    own_data,
    preset,
    stem_from_flags,
)
from mnist_resnet.errors import Interrupted, UserError, printable

# The shipped models' names, without importing the package that holds them (it reads files).
PRETRAINED_NAMES = ("mnist", "fashion-mnist")
PRETRAINED_DEFAULT = "mnist"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
# export.FORMATS, without importing torch to build the parser (tests check they agree).
EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")

# (flag, config field, help) for every flag that overrides a preset value. Types and defaults
# come from the dataclasses, so the help text can never disagree with the code.
TRAIN_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--epochs", "epochs", "number of epochs to train"),
    ("--batch-size", "batch_size", "input batch size for training"),
    ("--test-batch-size", "test_batch_size", "input batch size for validation and test"),
    ("--lr", "lr", "peak learning rate"),
    ("--momentum", "momentum", "SGD momentum"),
    ("--weight-decay", "weight_decay", "weight decay on conv/linear weights (not BN, biases)"),
    ("--label-smoothing", "label_smoothing", "label smoothing of the cross-entropy loss"),
    ("--warmup-epochs", "warmup_epochs", "linear warmup length of the one-cycle schedule"),
    ("--optimizer", "optimizer", "sgd (Nesterov) or adadelta"),
    ("--schedule", "schedule", "onecycle (warmup + cosine) or step (x0.7 per epoch)"),
    ("--seed", "seed", "random seed"),
    ("--log-interval", "log_interval", "batches between progress-bar updates"),
    ("--threads", "threads", "CPU threads (0: one per available core)"),
    ("--patience", "patience", "stop after this many epochs without validation gain (0: off)"),
    ("--grad-clip", "grad_clip", "clip the gradient norm to this value (0: off)"),
    (
        "--ema-decay",
        "ema_decay",
        "average the weights with this decay, e.g. 0.999, reached after ~9/(1-DECAY) steps "
        "(0: off)",
    ),
    ("--distill-weight", "distill_weight", "with --teacher: the teachers' share of the loss"),
    (
        "--distill-temperature",
        "distill_temperature",
        "with --teacher: the temperature that softens teachers' and student's answers",
    ),
    ("--keep-last", "keep_last", "epoch checkpoints to keep besides best.pt"),
    ("--checkpoint-steps", "checkpoint_steps", "also checkpoint every N steps (0: per epoch)"),
    (
        "--compile-mode",
        "compile_mode",
        "with --compile: default, reduce-overhead (CUDA graphs), max-autotune, "
        "max-autotune-no-cudagraphs",
    ),
    ("--runs-dir", "runs_dir", "folder that holds run directories"),
    ("--name", "name", "run directory name (default: <preset>-<dataset>-s<seed>-<time>)"),
)
TRAIN_SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("--save-model", "save_model", "write checkpoints (best.pt and per-epoch files)"),
    ("--dry-run", "dry_run", "quickly check a single pass: one epoch of one batch"),
    (
        "--amp",
        "amp",
        "force bf16 autocast on (--amp) or off (--no-amp); unset, it is used on CUDA and on "
        "CPUs where a short cached probe measured it faster than fp32",
    ),
    ("--channels-last", "channels_last", "NHWC memory layout"),
    (
        "--device-data",
        "device_data",
        "keep the dataset on the training device and augment there, reading losses every "
        "--log-interval steps; unset, on a GPU yes, on a CPU no",
    ),
    ("--compile", "compile", "torch.compile the model (compile time counts)"),
    ("--deterministic", "deterministic", "deterministic algorithms, for bit-exact repeats"),
    ("--eval-test-every-epoch", "eval_test_every_epoch", "also report test metrics every epoch"),
    ("--skip-nonfinite", "skip_nonfinite", "skip steps whose loss is NaN/inf instead of stopping"),
    ("--sync-bn", "sync_bn", "with several processes: BatchNorm over the global batch (CUDA)"),
)
MODEL_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--depth", "depth", "network depth: 6n+2 (plain blocks) or 9n+2 (bottleneck)"),
    ("--block", "block", "plain or bottleneck"),
    ("--width", "width", "width multiplier of the 16/32/64 channel stages"),
    (
        "--stem",
        "stem",
        "what the picture goes through before the first stage: "
        + "; ".join(f"{name}: {text}" for name, text in STEMS.items()),
    ),
)
# The stem's flags of older versions, kept as other spellings of --stem.
OLD_STEM_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--stem-stride", "stem_stride", "--stem-stride 2 is --stem stride2"),
    ("--stem-pool", "stem_pool", "--stem pool"),
    ("--pool-before-norm", "pool_before_norm", "with --stem-pool: --stem pool-first"),
    ("--stem-unshuffle", "stem_unshuffle", "--stem unshuffle"),
)
DATA_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--val-size", "val_size", "training images held out for validation"),
    ("--split-seed", "split_seed", "seed of the validation split"),
    ("--max-shift", "max_shift", "random translation in pixels for augmentation"),
    ("--rotate", "rotate", "random rotation up to this many degrees (0: off)"),
    ("--scale", "scale", "random zoom by up to this fraction, e.g. 0.1 (0: off)"),
    ("--erase", "erase", "Cutout: side of one blanked square per image, pixels (0: off)"),
    ("--elastic", "elastic", "elastic distortion strength in pixels, e.g. 34 (0: off)"),
    ("--elastic-sigma", "elastic_sigma", "smoothness of the elastic distortion, pixels"),
    ("--subset", "subset", "fraction of the training split to use"),
    (
        "--preprocess",
        "preprocess",
        "own image files: mnist (crop to the ink, centre it, as predict does for digits), "
        "fashion (product photos, as Fashion-MNIST was made) or resize (grayscale, whole picture "
        "to 28x28); predict and serve then do the same. Named datasets need none: predict "
        "prepares pictures as each was made (fashion for fashion-mnist, else mnist)",
    ),
    (
        "--test-fraction",
        "test_fraction",
        "own data without a test set: share of each class held out for testing",
    ),
)


def _field_type(cls: type[Any], name: str) -> type[Any]:
    value = getattr(cls(), name)
    return type(value)


def _add_overrides(
    parser: argparse.ArgumentParser, cls: type[Any], flags: tuple[tuple[str, str, str], ...]
) -> None:
    defaults = cls()
    for flag, name, text in flags:
        parser.add_argument(
            flag,
            dest=f"{cls.__name__}.{name}",
            type=_field_type(cls, name),
            default=None,
            metavar=name.upper(),
            help=f"{text} (default: {getattr(defaults, name)!r}, or the preset's)",
        )


def _add_switches(
    parser: argparse.ArgumentParser, cls: type[Any], flags: tuple[tuple[str, str, str], ...]
) -> None:
    defaults = cls()
    for flag, name, text in flags:
        parser.add_argument(
            flag,
            dest=f"{cls.__name__}.{name}",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=text
            if getattr(defaults, name) is None
            else f"{text} (default: {getattr(defaults, name)}, or the preset's)",
        )


def _dataset(text: str) -> str:
    """A dataset name, or `folder:PATH` / `npz:PATH` with PATH made absolute, so that a resume
    from another folder (or a torchrun rank) reads the same files."""
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


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        type=_dataset,
        default=None,
        metavar="DATASET",
        help=f"{', '.join(DATASET_NAMES)}, or your own images: folder:PATH (one sub-folder of "
        "images per class, optional PATH/test/) or npz:PATH (arrays x, y, optional "
        "class_names) (default: mnist)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data root, torchvision layout (default: $MNIST_RESNET_DATA or ./data)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-resnet",
        description="Train, evaluate and explain ResNet classifiers for MNIST-style images.",
    )
    parser.add_argument("--version", action="version", version=f"mnist-resnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model and report its test accuracy")
    train.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"recipe: {', '.join(PRESETS)} (default: %(default)s)",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue a killed run: its run directory or a checkpoint (no PATH: newest run); "
        "its settings and data folder are the run's own, --data-dir says where its files are now",
    )
    train.add_argument(
        "--no-accel", action="store_true", help="use the CPU even when a GPU is available"
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train with N processes on this machine (launches torchrun); --batch-size is per "
        "process, so the global batch and the SGD learning rate grow N times",
    )
    train.add_argument("--no-augment", action="store_true", help="disable all augmentation")
    train.add_argument(
        "--flip",
        dest="DataConfig.flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mirror half the training images left to right: for clothes, never digits "
        "(default: off, or the preset's)",
    )
    train.add_argument(
        "--no-shortcut", action="store_true", help="remove the skip connections (plain net)"
    )
    train.add_argument(
        "--teacher",
        action="append",
        metavar="CKPT",
        help="distil: also learn from this trained checkpoint's softened answers on the same "
        "batches (repeat for several: their mean is the target)",
    )
    _add_data_options(train)
    _add_overrides(train, TrainConfig, TRAIN_FLAGS)
    _add_switches(train, TrainConfig, TRAIN_SWITCHES)
    _add_overrides(train, ModelConfig, MODEL_FLAGS)
    for flag, name, text in OLD_STEM_FLAGS:
        dest, help_text = f"old_stem.{name}", f"older spelling of {text}"
        if name == "stem_stride":
            train.add_argument(flag, dest=dest, type=int, metavar="N", help=help_text)
        else:
            train.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text
            )
    _add_overrides(train, DataConfig, DATA_FLAGS)

    ev = sub.add_parser("evaluate", help="test accuracy, per-class accuracy, confusion matrix")
    _add_model_choice(ev)
    ev.add_argument(
        "--data-dir", default=None, help="data root (default: $MNIST_RESNET_DATA or ./data)"
    )
    ev.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for figures (default: beside the checkpoint; pretrained-NAME/ for a shipped "
        "model)",
    )
    ev.add_argument("--test-batch-size", type=int, default=TrainConfig().test_batch_size)
    ev.add_argument("--no-accel", action="store_true", help="use the CPU even with a GPU")

    cal = sub.add_parser(
        "calibrate",
        help="fit a trained model's temperature and out-of-distribution detector on its "
        "validation and training images, and store them with it",
    )
    _add_model_choice(cal)
    cal.add_argument(
        "--data-dir", default=None, help="data root (default: $MNIST_RESNET_DATA or ./data)"
    )
    cal.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the calibrated checkpoint here (default: the checkpoint itself, rewritten "
        "atomically; a shipped model's go into its NAME.json)",
    )

    en = sub.add_parser(
        "ensemble", help="average the softmax outputs of several checkpoints (and test-time shifts)"
    )
    en.add_argument("checkpoints", nargs="+", type=Path, metavar="CKPT", help="checkpoint files")
    en.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="test, or the validation images the checkpoints held out (default: %(default)s)",
    )
    en.add_argument(
        "--tta", action="store_true", help="also average over one-pixel shifts of each image"
    )
    en.add_argument(
        "--select",
        type=int,
        default=0,
        metavar="N",
        help="first choose up to N of the checkpoints on the validation split (greedy forward "
        "selection by validation errors), then report the chosen ensemble (default: use all)",
    )
    en.add_argument(
        "--data-dir", default=None, help="data root (default: $MNIST_RESNET_DATA or ./data)"
    )
    en.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="also write results here"
    )
    en.add_argument("--test-batch-size", type=int, default=TrainConfig().test_batch_size)
    en.add_argument("--no-accel", action="store_true", help="use the CPU even with a GPU")

    summary = sub.add_parser("summary", help="parameters and FLOPs per image of the presets")
    summary.add_argument("presets", nargs="*", help="preset names (default: all)")

    data = sub.add_parser("data", help="obtain, verify or describe a dataset")
    data.add_argument("action", choices=("fetch", "verify", "info"))
    _add_data_options(data)

    pr = sub.add_parser("predict", help="classify image files (any size, colour, polarity)")
    pr.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH",
        help="an optional checkpoint file first (.pt or .safetensors; without one, the pretrained "
        "MNIST model), then image files, folders or globs",
    )
    _add_pretrained(pr)
    pr.add_argument("--top-k", type=int, default=3, help="classes to show (default: %(default)s)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")
    pr.add_argument(
        "--save-preprocessed",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the 28x28 images the model saw to DIR",
    )

    xp = sub.add_parser(
        "explain",
        help="what the model looked at: attribution maps and feature maps, one PNG per image",
    )
    xp.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH",
        help="an optional checkpoint file first (without one, the pretrained MNIST model), "
        "then image files, folders or globs",
    )
    _add_pretrained(xp)
    xp.add_argument(
        "--out",
        type=Path,
        default=Path("explained"),
        metavar="DIR",
        help="folder for the figures (default: %(default)s)",
    )
    xp.add_argument(
        "--steps",
        type=int,
        default=None,
        help="integration steps of the integrated gradients (default: 64)",
    )
    xp.add_argument("--json", action="store_true", help="print the numbers as JSON")

    ex = sub.add_parser(
        "export", help="ONNX, TorchScript or safetensors file, checked against PyTorch"
    )
    _add_model_choice(ex)
    ex.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    ex.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output file (default: beside the checkpoint; pretrained-NAME.onnx for a shipped "
        "model)",
    )
    ex.add_argument(
        "--data-dir",
        default=None,
        help="data root with the test images for the parity check "
        "(default: $MNIST_RESNET_DATA or ./data)",
    )

    sv = sub.add_parser("serve", help="HTTP API and draw-a-digit page")
    _add_model_choice(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    sv.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s)")
    sv.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this Host name (repeatable; localhost names always); "
        "needed when the server is reached by a name or address other than localhost",
    )
    sv.add_argument(
        "--workers",
        type=int,
        default=ServeConfig.workers,
        help="server processes, each with its own model; one per core uses them all "
        "(default: %(default)s)",
    )
    sv.add_argument(
        "--threads",
        type=int,
        default=ServeConfig.threads,
        help="inference threads per worker (default: %(default)s)",
    )
    sv.add_argument(
        "--max-batch",
        type=int,
        default=ServeConfig.max_batch,
        help="images per model call when requests are batched together (default: %(default)s)",
    )
    sv.add_argument(
        "--max-delay-ms",
        type=float,
        default=ServeConfig.max_delay_ms,
        help="longest wait of a request for others to batch with (default: %(default)s)",
    )
    sv.add_argument(
        "--engine",
        choices=SERVE_ENGINES,
        default=ServeConfig.engine,
        help="auto: ONNX Runtime when installed, else PyTorch (default: %(default)s)",
    )
    sv.add_argument(
        "--header-timeout",
        type=float,
        default=ServeConfig.header_timeout_s,
        metavar="SECONDS",
        help="close connections that have not sent a request's headers by then "
        "(default: %(default)s)",
    )
    sv.add_argument(
        "--body-timeout",
        type=float,
        default=ServeConfig.body_timeout_s,
        metavar="SECONDS",
        help="408 when an upload pauses longer than this (default: %(default)s)",
    )
    sv.add_argument(
        "--request-timeout",
        type=float,
        default=ServeConfig.request_timeout_s,
        metavar="SECONDS",
        help="408 for an upload not complete by then, 503 for a request not answered by then "
        "once its upload is in (default: %(default)s)",
    )
    sv.add_argument(
        "--max-concurrency",
        type=int,
        default=ServeConfig.max_concurrency,
        help="requests preparing their images at once per worker; more wait with their uploads "
        "read, which hold at most this many 5 MB bodies (default: %(default)s)",
    )
    sv.add_argument(
        "--max-connections",
        type=int,
        default=ServeConfig.max_connections,
        help="connections served at once per worker, idle ones included (default: %(default)s)",
    )
    pt = sub.add_parser("pretrained", help="the models shipped in the package; package a run")
    actions = pt.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="what each shipped model is and how it was made (default)")
    pk = actions.add_parser(
        "package", help="turn a finished run of a model's recipe into the shipped files"
    )
    pk.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run, e.g. runs/NAME")
    pk.add_argument("--name", required=True, choices=PRETRAINED_NAMES, help="which model")
    pk.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for NAME.safetensors and NAME.json (default: the installed package's)",
    )
    pk.add_argument(
        "--data-dir",
        default=None,
        help="data root with the test images to measure it on "
        "(default: $MNIST_RESNET_DATA or ./data)",
    )
    xp = sub.add_parser("experiment", help="reproduce a figure of the ResNet paper")
    xp.add_argument(
        "study",
        choices=("degradation",),
        help="degradation: plain vs residual nets of each depth (He et al. 2015, Fig. 6)",
    )
    _add_experiment_options(xp)
    return parser


def _add_pretrained(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pretrained",
        choices=PRETRAINED_NAMES,
        default=None,
        help="use a model shipped in the package instead of a checkpoint (without either: "
        f"{PRETRAINED_DEFAULT})",
    )


def _add_model_choice(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        type=Path,
        nargs="?",
        default=None,
        help="a checkpoint file, e.g. runs/NAME/best.pt (default: the pretrained "
        f"{PRETRAINED_DEFAULT} model)",
    )
    _add_pretrained(parser)


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    from mnist_resnet.experiments import DegradationConfig

    d = DegradationConfig()
    parser.add_argument(
        "--dataset", choices=DATASET_NAMES, default=d.dataset, help="dataset (default: %(default)s)"
    )
    parser.add_argument(
        "--depths",
        type=int,
        nargs="+",
        default=list(d.depths),
        metavar="DEPTH",
        help="depths 6n+2 to compare (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, default=d.epochs, help="epochs per net (default: %(default)s)"
    )
    parser.add_argument(
        "--seeds", type=int, default=d.seeds, help="seeds 1..K per net (default: %(default)s)"
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=d.train_images,
        help="training images used (default: %(default)s)",
    )
    parser.add_argument(
        "--val-images",
        type=int,
        default=d.val_images,
        help="validation images (default: %(default)s)",
    )
    parser.add_argument(
        "--test-images",
        type=int,
        default=d.test_images,
        help="test images, 0 for all (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help="peak learning rate, the same for every net (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="batch size (default: %(default)s)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="data root (default: $MNIST_RESNET_DATA or ./data)"
    )
    parser.add_argument(
        "--runs-dir", default=TrainConfig().runs_dir, help="parent folder (default: %(default)s)"
    )
    parser.add_argument(
        "--name", default="", help="experiment folder name (default: degradation-<dataset>)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0: one per available core)"
    )


def _overrides(args: argparse.Namespace, cls: type[Any]) -> dict[str, Any]:
    prefix = f"{cls.__name__}."
    return {
        key[len(prefix) :]: value
        for key, value in vars(args).items()
        if key.startswith(prefix) and value is not None
    }


def train_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """Preset values, then every flag the user gave on top."""
    chosen = preset(args.preset)
    model_cfg = dataclasses.replace(chosen.model, **_overrides(args, ModelConfig))
    old_stem = {
        k[len("old_stem.") :]: v for k, v in vars(args).items() if k.startswith("old_stem.")
    }
    if any(v is not None for v in old_stem.values()):
        flags: dict[str, Any] = {k: getattr(model_cfg, k) for k in old_stem}
        flags.update({k: v for k, v in old_stem.items() if v is not None})
        model_cfg = dataclasses.replace(model_cfg, stem=stem_from_flags(**flags))
    if args.no_shortcut:
        model_cfg = dataclasses.replace(model_cfg, shortcut=False, zero_init_residual=False)
    train_over = _overrides(args, TrainConfig)
    if args.no_accel:
        train_over["accel"] = False
    if args.teacher:
        # Absolute, like the data folder: a resumed run finds them from anywhere.
        train_over["teachers"] = tuple(str(Path(t).expanduser().absolute()) for t in args.teacher)
    train_cfg = dataclasses.replace(chosen.train, **train_over)
    data_over = _overrides(args, DataConfig)
    if args.dataset:
        data_over["dataset"] = args.dataset
    # Absolute, as for own data: a resume from another folder reads the files the run used.
    data_over["data_dir"] = str(Path(args.data_dir or default_data_dir()).expanduser().absolute())
    if args.no_augment:
        data_over["augment"] = False
    data_cfg = dataclasses.replace(chosen.data or DataConfig(), **data_over)
    return model_cfg, train_cfg, data_cfg


def _resume_path(value: str, runs_dir: str) -> Path:
    if value != "latest":
        return Path(value)
    runs = sorted(Path(runs_dir).glob("*/checkpoints"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError(f"--resume: no run with checkpoints under {runs_dir}/")
    return runs[-1].parent


def _launch_processes(args: argparse.Namespace, train_cfg: TrainConfig) -> int:
    """`train --nproc N`: the same command under torchrun with N processes on this machine."""
    from mnist_resnet import distributed

    if distributed.env_from_os().world_size > 1:
        raise ConfigError("--nproc launches torchrun itself; leave it out when using torchrun")
    rest = distributed.strip_option(args.argv, "--nproc")
    if build_parser().parse_args(rest).nproc is not None:
        raise ConfigError("write the option in full: --nproc N")
    return distributed.launch(args.nproc, rest, threads=train_cfg.threads)


def _writable_folder(folder: Path, flag: str) -> Path:
    """Prove a file can be written in `folder`, before the long part. Folders made for the
    proof are removed again: a command that then fails leaves nothing behind (the command
    makes them when it writes there)."""
    from mnist_resnet.files import prove_writable

    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        prove_writable(folder)
    except OSError as e:
        raise ConfigError(f"{flag} {folder}: cannot write there ({e.strerror or e})") from None
    finally:
        for path in made:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
    return folder


def _writable_file(path: Path, flag: str) -> Path:
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    _writable_folder(path.parent, flag)
    return path


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


@dataclasses.dataclass(frozen=True)
class ModelFile:
    path: Path
    pretrained: str | None  # the shipped model's name, or None for a checkpoint


def _model_file(checkpoint: Path | None, pretrained: str | None) -> ModelFile:
    """The checkpoint given, or a shipped model (the MNIST one by default, said in one line)."""
    from mnist_resnet import pretrained as shipped

    if checkpoint is not None and pretrained is not None:
        raise ConfigError(
            f"give a checkpoint ({checkpoint}) or --pretrained {pretrained}, not both"
        )
    if checkpoint is not None:
        return ModelFile(checkpoint, None)
    name = pretrained or shipped.DEFAULT
    path = shipped.weights_path(name)
    hint = "" if pretrained else " (give a checkpoint, or --pretrained fashion-mnist, to change)"
    print(f"using {shipped.describe(name)}{hint}", file=sys.stderr)
    return ModelFile(path, name)


def cmd_train(args: argparse.Namespace) -> int:
    from mnist_resnet.distributed import is_main_process
    from mnist_resnet.model import check_size
    from mnist_resnet.train import train

    model_cfg, train_cfg, data_cfg = train_configs(args)
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1:
        # A bad flag ends here, in one line, before N processes start.
        for cfg in (model_cfg, train_cfg, data_cfg):
            cfg.validate()
        check_size(model_cfg)
        return _launch_processes(args, train_cfg)
    resume = _resume_path(args.resume, train_cfg.runs_dir) if args.resume else None
    # A resumed run reads its data where it saved it, unless --data-dir says where it is now.
    result = train(
        model_cfg,
        train_cfg,
        data_cfg,
        preset=args.preset,
        resume=resume,
        resume_data_dir=data_cfg.data_dir if args.data_dir else None,
    )
    if not is_main_process():
        return 0
    print(
        f"selected epoch {result.best_epoch} of {result.epochs_run}; run directory {result.run_dir}"
    )
    print(f"training time: {result.seconds:.1f} s")
    print(f"test loss: {result.test.loss:.4f}")
    print(f"test accuracy: {result.test.accuracy:.2%}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mnist_resnet.evaluate import evaluate_checkpoint

    if args.test_batch_size < 1:
        raise ConfigError(f"--test-batch-size must be >= 1, got {args.test_batch_size}")
    model = _model_file(args.checkpoint, args.pretrained)
    if not model.path.is_file():  # before the folder check below creates its folder
        raise ConfigError(f"checkpoint not found: {model.path}")
    # A shipped model's folder is the installed package: its figures go to the current folder.
    default_out = Path(f"pretrained-{model.pretrained}") if model.pretrained else None
    out = args.out or default_out
    # The figures are written after the whole evaluation: check their folder first.
    _writable_folder(out or model.path.parent, "--out")
    report = evaluate_checkpoint(
        model.path,
        data_dir=Path(args.data_dir or default_data_dir()),
        out_dir=out,
        batch_size=args.test_batch_size,
        accel=not args.no_accel,
    )
    print(report)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mnist_resnet.files import hash_file
    from mnist_resnet.posthoc import calibrate_checkpoint, calibrate_shipped

    model = _model_file(args.checkpoint, args.pretrained)
    if not model.path.is_file():
        raise ConfigError(f"checkpoint not found: {model.path}")
    data_dir = Path(args.data_dir or default_data_dir())
    if model.pretrained is not None and args.out is None:
        calibrate_shipped(model.path, data_dir=data_dir)
        print(f"wrote the calibration into {model.path} and {model.path.with_suffix('.json').name}")
        pin = f"{model.pretrained!r}: {hash_file(model.path)!r}"
        print(f"pin it in src/mnist_resnet/pretrained/__init__.py, in SHA256: {pin}")
        return 0
    if args.out is not None:
        _writable_file(args.out, "--out")
    calibrate_checkpoint(model.path, data_dir=data_dir, out=args.out)
    print(f"wrote {args.out or model.path}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from mnist_resnet.ensemble import ensemble, select_members, write_json

    if args.test_batch_size < 1:
        raise ConfigError("--test-batch-size must be >= 1")
    if args.select < 0:
        raise ConfigError(f"--select must be >= 0, got {args.select}")
    if args.json is not None:
        _writable_file(args.json, "--json")
    # The same data, views and batching for choosing the members and for reporting them.
    options: dict[str, Any] = {
        "data_dir": Path(args.data_dir or default_data_dir()),
        "tta": args.tta,
        "batch_size": args.test_batch_size,
        "accel": not args.no_accel,
    }
    views = " with test-time shifts" if args.tta else ""
    checkpoints = args.checkpoints
    if args.select:
        print(f"choosing up to {args.select} of {len(checkpoints)} models on the validation split:")
        checkpoints = select_members(checkpoints, max_members=args.select, **options)
    print(f"{args.split} accuracy of each model{views}:")
    result = ensemble(checkpoints, split=args.split, **options)
    if args.json is not None:
        write_json(result, args.json)
    n = len(result.members)
    print(
        f"ensemble of {n} model{'s' if n > 1 else ''}{views} on {result.dataset} "
        f"{result.split} ({result.count} images): loss {result.loss:.4f}"
    )
    print(f"{result.split} accuracy: {result.accuracy:.2%}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from mnist_resnet.model import summary

    for name in args.presets or list(PRESETS):
        print(f"== {name}: {preset(name).description}")
        print(summary(preset(name).model))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from mnist_resnet import data

    name = args.dataset or DataConfig().dataset
    root = Path(args.data_dir or default_data_dir())
    if own_data(name) is not None and args.action != "info":
        raise ConfigError(f"{name} is your own data: nothing to {args.action}; try `data info`")
    if args.action == "fetch":
        data.fetch(name, root)
        print(f"{name}: verified files in {root}")
    elif args.action == "verify":
        for line in data.verify(name, root):
            print(line)
        print(f"{name}: all files verified")
    else:
        print(data.format_info(data.info(name, root)))
    return 0


def _checkpoint_then_images(given: Sequence[str], verb: str) -> tuple[Path | None, list[str]]:
    """An optional checkpoint file first, then the images: (checkpoint or None, images)."""
    inputs = list(given)
    if Path(inputs[0]).suffix.lower() not in CHECKPOINT_SUFFIXES:
        return None, inputs
    checkpoint = Path(inputs.pop(0))
    if not inputs:
        raise ConfigError(f"give the image files to {verb} after {checkpoint}")
    return checkpoint, inputs


def cmd_predict(args: argparse.Namespace) -> int:
    from mnist_resnet.predict import Classifier, format_results, predict_files

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    checkpoint, inputs = _checkpoint_then_images(args.inputs, "classify")
    if args.save_preprocessed is not None:
        _writable_folder(args.save_preprocessed, "--save-preprocessed")
    model = _model_file(checkpoint, args.pretrained)
    results = predict_files(
        Classifier.from_checkpoint(model.path),
        inputs,
        k=args.top_k,
        save_preprocessed=args.save_preprocessed,
    )
    print(format_results(results, as_json=args.json))
    # Only inputs that cannot be read fail the command; a blank image is reported, not fatal.
    return 1 if any(r.unreadable for r in results) else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from mnist_resnet import explain
    from mnist_resnet.checkpoint import load_model

    steps = explain.STEPS if args.steps is None else args.steps
    if not 2 <= steps <= 1024:
        raise ConfigError(f"--steps must be between 2 and 1024, got {steps}")
    checkpoint, inputs = _checkpoint_then_images(args.inputs, "explain")
    _writable_folder(args.out, "--out")
    loaded = load_model(_model_file(checkpoint, args.pretrained).path)
    results = explain.explain_files(loaded, inputs, args.out, steps=steps)
    print(explain.format_files(results, loaded.class_names, as_json=args.json))
    return 1 if any(r.explanation is None for r in results) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from mnist_resnet.export import SUFFIXES, export

    model = _model_file(args.checkpoint, args.pretrained)
    suffix = SUFFIXES[args.format]
    default_out = Path(f"pretrained-{model.pretrained}{suffix}") if model.pretrained else None
    report = export(
        model.path,
        args.format,
        out=args.out or default_out,
        data_dir=Path(args.data_dir or default_data_dir()),
    )
    print("\n".join(report.lines()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mnist_resnet.checkpoint import load_model

    try:
        from mnist_resnet.serve import serve
    except ImportError as e:
        raise ConfigError(
            f"serve needs the serve extra ({e.name} is missing): pip install 'mnist-resnet[serve]'"
        ) from None
    hosts = list(args.allowed_host)
    if args.host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        hosts.append(args.host)  # the address it was told to bind is a name clients will use
    config = ServeConfig(
        host=args.host,
        port=args.port,
        workers=args.workers,
        threads=args.threads,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        engine=args.engine,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        request_timeout_s=args.request_timeout,
        max_concurrency=args.max_concurrency,
        max_connections=args.max_connections,
        allowed_hosts=tuple(hosts),
    )
    config.validate()
    model = _model_file(args.checkpoint, args.pretrained)
    if not model.path.is_file():
        raise ConfigError(f"checkpoint not found: {model.path}")
    # Checked here, once: the worker processes load it again, and a bad file there would only
    # be a dead worker.
    load_model(model.path)
    try:  # a port in use (or a host not on this machine) is one line, not the server's exit
        socket.create_server((args.host, args.port)).close()
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    shown = f"the pretrained {model.pretrained} model" if model.pretrained else model.path
    shown = printable(str(shown))
    workers = f"{config.workers} worker{'s' if config.workers > 1 else ''}"
    print(f"serving {shown} on http://{args.host}:{args.port}/ ({workers}; Ctrl-C stops)")
    serve(model.path, config)
    return 0


def cmd_pretrained(args: argparse.Namespace) -> int:
    from mnist_resnet import packaging, pretrained

    if args.action == "package":
        done = packaging.package(
            args.run_dir,
            args.name,
            out_dir=args.out or pretrained.FOLDER,
            data_dir=Path(args.data_dir or default_data_dir()),
        )
        meta = done.meta
        print(
            f"wrote {done.path} ({done.size:,} bytes) and {done.path.with_suffix('.json').name}: "
            f"test accuracy {meta['test_accuracy']:.2%} as trained, "
            f"{meta['fp32_cpu_test_accuracy']:.2%} in fp32 on the CPU"
        )
        pin = f"{args.name!r}: {done.sha256!r}"
        print(f"pin it in src/mnist_resnet/pretrained/__init__.py, in SHA256: {pin}")
        return 0
    for name in pretrained.NAMES:
        meta = pretrained.metadata(name)
        shipped = name in pretrained.SHA256
        print(f"{name}: {pretrained.describe(name) if shipped else 'not shipped in this build'}")
        if shipped and meta:
            print(f"  classes: {printable(', '.join(meta.get('classes', [])))}")
            inputs = f"({meta.get('preprocess')} preparation): {meta.get('inputs')}"
            print(f"  inputs {printable(inputs)}")
            made = f"{meta.get('trained')} by: {meta.get('command')}"
            print(f"  trained {printable(made)} (make pretrained)")
            print(f"  {meta.get('bytes', 0):,} bytes, sha256 {pretrained.SHA256[name]}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from mnist_resnet.experiments import DegradationConfig
    from mnist_resnet.experiments.degradation import run

    cfg = DegradationConfig(
        dataset=args.dataset,
        depths=tuple(args.depths),
        epochs=args.epochs,
        seeds=args.seeds,
        train_images=args.train_images,
        val_images=args.val_images,
        test_images=args.test_images,
        lr=args.lr,
        batch_size=args.batch_size,
    )
    result = run(
        cfg,
        data_dir=args.data_dir or default_data_dir(),
        runs_dir=args.runs_dir,
        name=args.name,
        threads=args.threads,
    )
    print(f"table: {result.exp_dir / 'degradation.md'}")
    print(f"figures: {result.exp_dir / 'degradation.png'}, {result.exp_dir / 'grad-norms.png'}")
    print(
        f"{len(result.trained)} runs trained, {len(result.reused)} reused, "
        f"{result.seconds:.0f} s in all"
    )
    deepest = max(cfg.depths)
    errors = {r["kind"]: r["train_error"]["mean"] for r in result.rows if r["depth"] == deepest}
    print(
        f"residual-{deepest} train error: {errors['residual']:.2%}, "
        f"plain-{deepest} train error: {errors['plain']:.2%}"
    )
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "summary": cmd_summary,
    "data": cmd_data,
    "predict": cmd_predict,
    "explain": cmd_explain,
    "export": cmd_export,
    "serve": cmd_serve,
    "experiment": cmd_experiment,
    "ensemble": cmd_ensemble,
    "calibrate": cmd_calibrate,
    "pretrained": cmd_pretrained,
}


BATCH_LOOP_COMMANDS = ("train", "evaluate", "ensemble", "experiment", "calibrate")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `predict a.png --top-k 2 b.png`: paths after an option are more inputs (argparse stops
    # collecting a positional at the first option); anything else unknown is still an error.
    if (
        args.command in ("predict", "explain")
        and extra
        and not any(e.startswith("-") for e in extra)
    ):
        args.inputs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv  # `train --nproc` hands the command line on to torchrun
    from mnist_resnet.distributed import is_main_process
    from mnist_resnet.runtime import retain_freed_memory

    if args.command in BATCH_LOOP_COMMANDS:
        # They loop over batches: freed buffers are kept for reuse. predict, serve and export
        # leave the process's malloc settings as they are.
        retain_freed_memory()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        # Under torchrun every rank meets the same error; rank 0 says it once.
        if is_main_process():
            # One line whatever the message holds: a file or class name with a newline or an
            # ANSI escape in it is shown escaped.
            print(f"mnist-resnet: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if is_main_process():
            print(f"mnist-resnet: {printable(str(e))}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("mnist-resnet: aborted", file=sys.stderr)
        return 130
