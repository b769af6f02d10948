"""Command line: turns argv into configs and calls the library; nothing else lives here.

A setting's flag (its help, default, bounds and choices) is made from its config field by
`settings.add_flags`; what is written here is each command's own arguments (files, actions,
outputs) and the few lines that hand the configs to the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mnist_resnet import __version__
from mnist_resnet.config import (
    DEFAULT_PRESET,
    LEGACY_STEM_FLAGS,
    PRESETS,
    ConfigError,
    DataConfig,
    EnsembleConfig,
    ExplainConfig,
    ModelConfig,
    PredictConfig,
    ServeConfig,
    TrainConfig,
    default_data_dir,
    own_data,
    preset,
    stem_from_flags,
)
from mnist_resnet.errors import Interrupted, UserError, printable
from mnist_resnet.experiments import DegradationConfig
from mnist_resnet.pretrained import DEFAULT as PRETRAINED_DEFAULT
from mnist_resnet.pretrained import NAMES as PRETRAINED_NAMES
from mnist_resnet.pretrained import RUNS as PRETRAINED_RUNS
from mnist_resnet.pretrained import choose
from mnist_resnet.settings import add_flags, from_args, given

# export.FORMATS, without importing torch to build the parser (tests check they agree).
EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")


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
        # None until given: a resumed run must tell an asked-for preset from the default.
        default=None,
        help=f"recipe: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="PATH",
        help="continue a killed run: its run directory or a checkpoint (no PATH: newest run); "
        "its recipe and data folder are the run's own (a flag that changes the recipe is refused; "
        "--threads, --no-accel and the checkpoint/log intervals apply), --data-dir says where its "
        "files are now",
    )
    train.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with N processes on this machine (launches torchrun); --batch-size is per "
        "process, so the global batch and the SGD learning rate grow N times",
    )
    for cls in (DataConfig, TrainConfig, ModelConfig):
        add_flags(train, cls, presets=True)
    for name, text in LEGACY_STEM_FLAGS.items():
        flag, dest, help_text = (
            "--" + name.replace("_", "-"),
            f"old_stem.{name}",
            f"older spelling of {text}",
        )
        if name == "stem_stride":
            train.add_argument(flag, dest=dest, type=int, metavar="N", help=help_text)
        else:
            train.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text
            )

    ev = sub.add_parser("evaluate", help="test accuracy, per-class accuracy, confusion matrix")
    _add_model(
        ev,
        "folder for figures (default: beside the checkpoint; pretrained-NAME/ for a shipped model)",
    )
    add_flags(ev, TrainConfig, ["test_batch_size", "accel"])
    cal = sub.add_parser(
        "calibrate",
        help="fit a trained model's temperature and out-of-distribution detector on its "
        "validation and training images, and store them with it",
    )
    _add_model(
        cal,
        "write the calibrated checkpoint here (default: the checkpoint itself, rewritten "
        "atomically; a shipped model's go into its NAME.json)",
    )
    en = sub.add_parser(
        "ensemble", help="average the softmax outputs of several checkpoints (and test-time shifts)"
    )
    en.add_argument("checkpoints", nargs="+", type=Path, metavar="CKPT", help="checkpoint files")
    add_flags(en, EnsembleConfig)
    add_flags(en, DataConfig, ["data_dir"])
    add_flags(en, TrainConfig, ["test_batch_size", "accel"])

    summary = sub.add_parser("summary", help="parameters and FLOPs per image of the presets")
    summary.add_argument("presets", nargs="*", help="preset names (default: all)")
    data = sub.add_parser("data", help="obtain, verify or describe a dataset")
    data.add_argument("action", choices=("fetch", "verify", "info"))
    add_flags(data, DataConfig, ["dataset", "data_dir"])

    pr = sub.add_parser("predict", help="classify image files (any size, colour, polarity)")
    _add_images(pr, "(.pt or .safetensors; without one, the pretrained MNIST model)")
    add_flags(pr, PredictConfig)
    xp = sub.add_parser(
        "explain",
        help="what the model looked at: attribution maps and feature maps, one PNG per image",
    )
    _add_images(xp, "(without one, the pretrained MNIST model)")
    add_flags(xp, ExplainConfig)

    ex = sub.add_parser(
        "export", help="ONNX, TorchScript or safetensors file, checked against PyTorch"
    )
    ex.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    _add_model(
        ex, "output file (default: beside the checkpoint; pretrained-NAME.onnx for a shipped model)"
    )
    sv = sub.add_parser("serve", help="HTTP API and draw-a-digit page")
    _add_model(sv)
    add_flags(sv, ServeConfig)

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
        help="folder for NAME.safetensors and NAME.json (default: the installed package's)",
    )
    add_flags(pk, DataConfig, ["data_dir"])
    tr = actions.add_parser(
        "train",
        help="train a model's recipe (its teachers first), keeping finished runs and resuming "
        "killed ones",
    )
    tr.add_argument("name", choices=PRETRAINED_NAMES, metavar="NAME", help="which model")
    add_flags(tr, DataConfig, ["data_dir"])
    add_flags(tr, TrainConfig, ["threads"])
    tr.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train up to N runs that do not need each other (an ensemble's members, a "
        "student's teachers) at once, sharing the threads (default: 1, one after another)",
    )
    tr.add_argument(
        "--runs-dir",
        type=Path,
        default=Path(PRETRAINED_RUNS),
        help=f"folder for the recipe's run folders (default: {PRETRAINED_RUNS})",
    )

    xp = sub.add_parser("experiment", help="reproduce a figure of the ResNet paper")
    xp.add_argument(
        "study",
        choices=("degradation",),
        help="degradation: plain vs residual nets of each depth (He et al. 2015, Fig. 6)",
    )
    add_flags(xp, DegradationConfig)
    add_flags(xp, DataConfig, ["data_dir"])
    add_flags(xp, TrainConfig, ["runs_dir", "threads"])
    xp.add_argument(
        "--name", default="", help="experiment folder name (default: degradation-<dataset>)"
    )
    return parser


def _add_pretrained(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pretrained",
        choices=PRETRAINED_NAMES,
        help="use a model shipped in the package instead of a checkpoint (without either: "
        f"{PRETRAINED_DEFAULT})",
    )


def _add_model(parser: argparse.ArgumentParser, out: str = "") -> None:
    """A checkpoint or --pretrained; with `out` (its help), also --out and --data-dir."""
    parser.add_argument(
        "checkpoint",
        type=Path,
        nargs="?",
        help="a checkpoint file, e.g. runs/NAME/best.pt (default: the pretrained "
        f"{PRETRAINED_DEFAULT} model)",
    )
    _add_pretrained(parser)
    if out:
        parser.add_argument("--out", type=Path, help=out)
        add_flags(parser, DataConfig, ["data_dir"])


def _add_images(parser: argparse.ArgumentParser, which: str) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH",
        help=f"an optional checkpoint file first {which}, then image files, folders or globs",
    )
    _add_pretrained(parser)


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(given(args, DataConfig).get("data_dir") or default_data_dir())


def train_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """Preset values, then every flag the user gave on top."""
    chosen = preset(args.preset or DEFAULT_PRESET)
    model_cfg = from_args(ModelConfig, args, chosen.model)
    old_stem = {
        k.removeprefix("old_stem."): v
        for k, v in vars(args).items()
        if k.startswith("old_stem.") and v is not None
    }
    if old_stem:
        flags = {k: getattr(model_cfg, k) for k in LEGACY_STEM_FLAGS} | old_stem
        if not flags["stem_pool"] and "pool_before_norm" not in old_stem:
            # --no-stem-pool on a pool-first preset: the pool's placement goes with the pool.
            flags["pool_before_norm"] = False
        model_cfg = dataclasses.replace(model_cfg, stem=stem_from_flags(**flags))
    # Absolute, as for own data: a resume from another folder reads the files the run used.
    data_dir = str(_data_dir(args).expanduser().absolute())
    data_cfg = from_args(DataConfig, args, chosen.data or DataConfig(), data_dir=data_dir)
    return model_cfg, from_args(TrainConfig, args, chosen.train), data_cfg


def _launch_processes(args: argparse.Namespace, train_cfg: TrainConfig) -> int:
    """`train --nproc N`: the same command under torchrun with N processes on this machine."""
    from mnist_resnet import distributed

    if distributed.env_from_os().world_size > 1:
        raise ConfigError("--nproc launches torchrun itself; leave it out when using torchrun")
    rest = distributed.strip_option(args.argv, "--nproc")
    if build_parser().parse_args(rest).nproc is not None:
        raise ConfigError("write the option in full: --nproc N")
    return distributed.launch(args.nproc, rest, threads=train_cfg.threads)


def _train_flags(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig flags another command shares with train (--test-batch-size, --no-accel,
    --runs-dir, --threads), checked."""
    cfg = from_args(TrainConfig, args)
    cfg.validate()
    return cfg


def _given_fields(args: argparse.Namespace) -> dict[str, set[str]]:
    """The config fields set on the command line, by config class name (the legacy stem flags
    set `stem`), so that a resumed run can tell them from its own settings."""
    fields = {cls.__name__: set(given(args, cls)) for cls in (ModelConfig, TrainConfig, DataConfig)}
    if any(k.startswith("old_stem.") and v is not None for k, v in vars(args).items()):
        fields["ModelConfig"].add("stem")
    if getattr(args, "preset", None) is not None:
        fields["run"] = {"preset"}
    return fields


def cmd_train(args: argparse.Namespace) -> int:
    from mnist_resnet.distributed import is_main_process
    from mnist_resnet.model import check_size
    from mnist_resnet.runs import resume_target
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
    resume = resume_target(args.resume, train_cfg.runs_dir) if args.resume else None
    # A resumed run reads its data where it saved it, unless --data-dir says where it is now.
    moved = "data_dir" in given(args, DataConfig)
    result = train(
        model_cfg,
        train_cfg,
        data_cfg,
        preset=args.preset or DEFAULT_PRESET,
        resume=resume,
        resume_data_dir=data_cfg.data_dir if moved else None,
        resume_given=_given_fields(args),
    )
    if is_main_process():
        print("\n".join(result.lines()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mnist_resnet import evaluate

    loop = _train_flags(args)
    model = choose(args.checkpoint, args.pretrained, must_exist=True)
    data_dir, batch = _data_dir(args), loop.test_batch_size
    return evaluate.main(model, data_dir=data_dir, out=args.out, batch_size=batch, accel=loop.accel)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mnist_resnet import posthoc

    model = choose(args.checkpoint, args.pretrained, must_exist=True)
    return posthoc.main(model, data_dir=_data_dir(args), out=args.out)


def cmd_ensemble(args: argparse.Namespace) -> int:
    from mnist_resnet.ensemble import report

    loop, cfg = _train_flags(args), from_args(EnsembleConfig, args)
    data_dir, batch = _data_dir(args), loop.test_batch_size
    report(args.checkpoints, cfg, data_dir=data_dir, batch_size=batch, accel=loop.accel)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from mnist_resnet.model import summary

    for name in args.presets or list(PRESETS):
        print(f"== {name}: {preset(name).description}")
        print(summary(preset(name).model))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from mnist_resnet import data

    name, root = from_args(DataConfig, args).dataset, _data_dir(args)
    if own_data(name) is not None and args.action != "info":
        raise ConfigError(f"{name} is your own data: nothing to {args.action}; try `data info`")
    if args.action == "fetch":
        data.fetch(name, root)
        print(f"{name}: verified files in {root}")
    elif args.action == "verify":
        print("\n".join([*data.verify(name, root), f"{name}: all files verified"]))
    else:
        print(data.format_info(data.info(name, root)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mnist_resnet import predict

    return predict.main(args.inputs, from_args(PredictConfig, args), pretrained=args.pretrained)


def cmd_explain(args: argparse.Namespace) -> int:
    from mnist_resnet import explain

    return explain.main(args.inputs, from_args(ExplainConfig, args), pretrained=args.pretrained)


def cmd_export(args: argparse.Namespace) -> int:
    from mnist_resnet.export import SUFFIXES, export

    model = choose(args.checkpoint, args.pretrained)
    shipped = Path(f"pretrained-{model.pretrained}{SUFFIXES[args.format]}")
    out = args.out or (shipped if model.pretrained else None)
    print("\n".join(export(model.path, args.format, out=out, data_dir=_data_dir(args)).lines()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from mnist_resnet.serve import start
    except ImportError as e:
        raise ConfigError(
            f"serve needs the serve extra ({e.name} is missing): pip install 'mnist-resnet[serve]'"
        ) from None
    config = from_args(ServeConfig, args)
    config.validate()
    model = choose(args.checkpoint, args.pretrained, must_exist=True)
    start(model.path, config, shown=model.shown)
    return 0


def cmd_pretrained(args: argparse.Namespace) -> int:
    from mnist_resnet import packaging, pretrained

    if args.action == "train":
        run_dir = packaging.train_recipe(
            args.name,
            args.runs_dir,
            data_dir=_data_dir(args),
            threads=_train_flags(args).threads,
            jobs=args.jobs,
        )
        print(f"run directory: {run_dir}")
        accuracy = packaging.recorded_test_accuracy(run_dir)
        if accuracy is not None:
            print(f"test accuracy: {accuracy:.2%}")
        return 0
    if args.action != "package":
        print("\n".join(pretrained.catalogue()))
        return 0
    out_dir = args.out or pretrained.FOLDER
    done = packaging.package(args.run_dir, args.name, out_dir=out_dir, data_dir=_data_dir(args))
    print("\n".join(done.lines()))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from mnist_resnet.experiments.degradation import run

    places = _train_flags(args)  # --runs-dir and --threads
    result = run(
        from_args(DegradationConfig, args),
        data_dir=str(_data_dir(args)),
        runs_dir=places.runs_dir,
        name=args.name,
        threads=places.threads,
    )
    print("\n".join(result.lines()))
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
    except BrokenPipeError:
        # `mnist-resnet pretrained | head -1`: the reader has gone. End as a tool killed by
        # SIGPIPE does, quietly; stdout goes to /dev/null so that flushing it at exit cannot
        # raise the same error again as a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
