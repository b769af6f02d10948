"""Experiment (issue 5): re-estimate BatchNorm statistics for averaged (EMA) weights?

    .venv/bin/python benchmarks/bn_recalibration.py --data-dir DIR CKPT...

The `best` recipe's checkpoints hold an exponential moving average of the weights, and of the
BatchNorm running statistics alongside them: statistics gathered by other weights than the
ones evaluated. SWA (Izmailov et al. 2018) instead re-estimates them with one pass over the
training images once the weights are averaged. This script compares, per checkpoint and on the
validation split only (the test set is never read), the validation errors of the saved model
with those of the same weights after a fresh, cumulative estimate of every BatchNorm's
statistics over the checkpoint's own training split, once on plain images and once on the
augmented batches the network trained on. Prints one line per checkpoint and the totals.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from mnist_resnet import data
from mnist_resnet.checkpoint import LoadedModel, load_model
from mnist_resnet.images import to_float
from mnist_resnet.inference import predict_logits
from mnist_resnet.precision import make_runtime
from mnist_resnet.runtime import Runtime, configure_threads

VARIANTS = ("saved", "recalibrated on plain images", "recalibrated on augmented batches")


def validation_errors(
    member: LoadedModel,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    runtime: Runtime,
) -> int:
    logits = predict_logits(
        runtime.prepare_model(model), images, mean=member.mean, std=member.std, runtime=runtime
    )
    return int((logits.argmax(1) != labels).sum())


@torch.no_grad()
def recalibrated(
    member: LoadedModel,
    train_images: torch.Tensor,
    *,
    augment: bool,
    runtime: Runtime,
    batch_size: int = 256,
    seed: int = 0,
) -> nn.Module:
    """A copy of the model whose BatchNorm statistics are re-estimated over `train_images`."""
    model = copy.deepcopy(member.model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over every batch, as SWA's update_bn
    model = runtime.prepare_model(model).train()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_images), generator=generator)
    no_labels = torch.zeros(len(train_images))
    for images, _ in data.batches(train_images, no_labels, order, batch_size, drop_last=True):
        if augment:
            x = data.training_batch(images, member.data_config, generator, member.mean, member.std)
        else:
            x = to_float(images, member.mean, member.std)
        model(runtime.prepare_input(x))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data-dir", type=Path, default=data.default_root())
    args = parser.parse_args(argv)
    configure_threads(0)
    runtime = make_runtime(accel=False, amp=False, channels_last=True)
    totals = [0, 0, 0]
    count = 0
    for path in args.checkpoints:
        member = load_model(path, fold=False)  # its batch norms are the subject
        cfg = member.data_config
        splits = data.load(cfg.dataset, args.data_dir, log=lambda _: None)
        train_x, _, val_x, val_y = data.split_validation(
            splits.train_images, splits.train_labels, cfg.val_size, cfg.split_seed
        )
        errors = [
            validation_errors(member, member.model, val_x, val_y, runtime),
            *(
                validation_errors(
                    member,
                    recalibrated(member, train_x, augment=augment, runtime=runtime),
                    val_x,
                    val_y,
                    runtime,
                )
                for augment in (False, True)
            ),
        ]
        totals = [t + e for t, e in zip(totals, errors, strict=True)]
        count += len(val_y)
        print(
            f"{path}: "
            + ", ".join(f"{v} {e}" for v, e in zip(VARIANTS, errors, strict=True))
            + f" validation errors of {len(val_y)}",
            flush=True,
        )
    for variant, total in zip(VARIANTS, totals, strict=True):
        print(f"{variant}: {total} validation errors of {count} ({total / count:.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
