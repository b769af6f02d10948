"""Command line: turns argv into configs and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnist_resnet import __version__
from mnist_resnet.config import (
    DATASET_NAMES,
    DEFAULT_PRESET,
    PRESETS,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    default_data_dir,
    preset,
)

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
    ("--keep-last", "keep_last", "epoch checkpoints to keep besides best.pt"),
    ("--runs-dir", "runs_dir", "folder that holds run directories"),
    ("--name", "name", "run directory name (default: <preset>-<dataset>-s<seed>-<time>)"),
)
TRAIN_SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("--save-model", "save_model", "write checkpoints (best.pt and per-epoch files)"),
    ("--dry-run", "dry_run", "quickly check a single pass: one epoch of one batch"),
    ("--amp", "amp", "bf16 autocast where the hardware supports it"),
    ("--channels-last", "channels_last", "NHWC memory layout"),
    ("--compile", "compile", "torch.compile the model (compile time counts)"),
    ("--deterministic", "deterministic", "deterministic algorithms, for bit-exact repeats"),
    ("--eval-test-every-epoch", "eval_test_every_epoch", "also report test metrics every epoch"),
)
MODEL_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--depth", "depth", "network depth: 6n+2 (plain blocks) or 9n+2 (bottleneck)"),
    ("--block", "block", "plain or bottleneck"),
    ("--width", "width", "width multiplier of the 16/32/64 channel stages"),
)
DATA_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--val-size", "val_size", "training images held out for validation"),
    ("--split-seed", "split_seed", "seed of the validation split"),
    ("--max-shift", "max_shift", "random translation in pixels for augmentation"),
    ("--subset", "subset", "fraction of the training split to use"),
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
            help=f"{text} (default: {getattr(defaults, name)}, or the preset's)",
        )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", choices=DATASET_NAMES, default=None, help="dataset (default: mnist)"
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
        help="continue a killed run: its run directory or a checkpoint (no PATH: newest run)",
    )
    train.add_argument(
        "--no-accel", action="store_true", help="use the CPU even when a GPU is available"
    )
    train.add_argument("--no-augment", action="store_true", help="disable random translation")
    train.add_argument(
        "--no-shortcut", action="store_true", help="remove the skip connections (plain net)"
    )
    _add_data_options(train)
    _add_overrides(train, TrainConfig, TRAIN_FLAGS)
    _add_switches(train, TrainConfig, TRAIN_SWITCHES)
    _add_overrides(train, ModelConfig, MODEL_FLAGS)
    _add_overrides(train, DataConfig, DATA_FLAGS)

    ev = sub.add_parser("evaluate", help="test accuracy, per-class accuracy, confusion matrix")
    ev.add_argument("checkpoint", type=Path, help="a checkpoint file, e.g. runs/NAME/best.pt")
    ev.add_argument(
        "--data-dir", default=None, help="data root (default: $MNIST_RESNET_DATA or ./data)"
    )
    ev.add_argument(
        "--out", type=Path, default=None, help="folder for figures (default: beside the checkpoint)"
    )
    ev.add_argument("--test-batch-size", type=int, default=TrainConfig().test_batch_size)
    ev.add_argument("--no-accel", action="store_true", help="use the CPU even with a GPU")

    summary = sub.add_parser("summary", help="parameters and FLOPs per image of the presets")
    summary.add_argument("presets", nargs="*", help="preset names (default: all)")

    data = sub.add_parser("data", help="obtain, verify or describe a dataset")
    data.add_argument("action", choices=("fetch", "verify", "info"))
    _add_data_options(data)
    return parser


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
    if args.no_shortcut:
        model_cfg = dataclasses.replace(model_cfg, shortcut=False, zero_init_residual=False)
    train_over = _overrides(args, TrainConfig)
    if args.no_accel:
        train_over["accel"] = False
    train_cfg = dataclasses.replace(chosen.train, **train_over)
    data_over = _overrides(args, DataConfig)
    if args.dataset:
        data_over["dataset"] = args.dataset
    if args.data_dir:
        data_over["data_dir"] = args.data_dir
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


def cmd_train(args: argparse.Namespace) -> int:
    from mnist_resnet.train import train

    model_cfg, train_cfg, data_cfg = train_configs(args)
    resume = _resume_path(args.resume, train_cfg.runs_dir) if args.resume else None
    result = train(model_cfg, train_cfg, data_cfg, preset=args.preset, resume=resume)
    print(
        f"selected epoch {result.best_epoch} of {result.epochs_run}; run directory {result.run_dir}"
    )
    print(f"training time: {result.seconds:.1f} s")
    print(f"test loss: {result.test.loss:.4f}")
    print(f"test accuracy: {result.test.accuracy:.2%}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mnist_resnet.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint,
        data_dir=Path(args.data_dir or default_data_dir()),
        out_dir=args.out,
        batch_size=args.test_batch_size,
        accel=not args.no_accel,
    )
    print(report)
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


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "summary": cmd_summary, "data": cmd_data}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mnist_resnet.checkpoint import CheckpointError
    from mnist_resnet.data import DataError
    from mnist_resnet.train import TrainingError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"mnist-resnet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnist-resnet: interrupted", file=sys.stderr)
        return 130
