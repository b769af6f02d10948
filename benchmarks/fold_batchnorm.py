"""Evaluation speed of trained checkpoints with and without their batch norms folded.

    .venv/bin/python benchmarks/fold_batchnorm.py --data-dir DIR CKPT...

`load_model` folds every eval-mode batch norm into the conv before it (model.fold_batchnorm),
so `evaluate`, `ensemble`, `predict`, `serve` and `export` run the folded network. This times
both forms of each checkpoint on its dataset's whole test set through `predict_logits` (batches
of 100, channels_last, fp32), alternating the two so the machine's drift falls on both alike,
and prints the medians, their ratio and the largest logit difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from mnist_resnet import data
from mnist_resnet.checkpoint import load_model
from mnist_resnet.inference import predict_logits
from mnist_resnet.model import folded_copy
from mnist_resnet.precision import make_runtime
from mnist_resnet.runtime import configure_threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data-dir", type=Path, default=data.default_root())
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    configure_threads(0)
    runtime = make_runtime(accel=False, amp=False, channels_last=True)
    for path in args.checkpoints:
        loaded = load_model(path, fold=False)
        models = {
            "unfolded": runtime.prepare_model(loaded.model),
            "folded": runtime.prepare_model(folded_copy(loaded.model)),
        }
        images = data.load(loaded.data_config.dataset, args.data_dir, log=lambda _: None)
        test = images.test_images
        rates: dict[str, list[float]] = {name: [] for name in models}
        logits: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                logits[name] = predict_logits(
                    model, test, mean=loaded.mean, std=loaded.std, runtime=runtime
                )
                rates[name].append(len(test) / (time.perf_counter() - start))
        plain, folded = (statistics.median(rates[n]) for n in ("unfolded", "folded"))
        diff = float((logits["folded"] - logits["unfolded"]).abs().max())
        print(
            f"{path}: unfolded {plain:,.0f} img/s, folded {folded:,.0f} img/s "
            f"({folded / plain:.2f}x), max |logit diff| {diff:.1e}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
