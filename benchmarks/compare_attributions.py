"""What a plain and a residual network of the same depth look at, on the same test images.

Reads two model files of the degradation study (`<study>/plain-D-s1/model.safetensors` and
`residual-D-s1/...`), draws integrated-gradients maps of each one's answer for the same test
images side by side, and measures on more images how faithful and how concentrated the maps are:
the deletion area (remove ink pixels in the map's order; lower: the map found what the answer
rests on) against a random order, and how mixed the map's signs are (the share of its absolute
mass that speaks against the answer). Blank pixels get exactly zero from integrated gradients
with a blank baseline, so everything is on the ink.

    .venv/bin/python benchmarks/compare_attributions.py runs/degradation-mnist \\
        --depth 56 --out docs/degradation-attributions.png \\
        --json benchmarks/results-attributions.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from mnist_resnet import data, plots
from mnist_resnet.checkpoint import LoadedModel, load_model
from mnist_resnet.config import DataConfig, default_data_dir
from mnist_resnet.experiments.degradation import MODEL_FILE
from mnist_resnet.explain import STEPS, area, attribution_order, deletion_curve, explain, overlay

KINDS = ("plain", "residual")


def measure(loaded: LoadedModel, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, deletion areas (map vs random order) and ink share of the maps, per model."""
    gen = torch.Generator().manual_seed(0)
    found = explain(loaded, images.numpy(), classes=1, maps_per_stage=0)
    deletion, random, against, right = [], [], [], 0
    for e, label in zip(found, labels, strict=True):
        right += int(e.classes[0] == int(label))
        a = e.attributions[0]
        target = e.classes[0]
        deletion.append(area(deletion_curve(loaded, e.image, target, attribution_order(a))))
        order = torch.randperm(a.numel(), generator=gen)
        random.append(area(deletion_curve(loaded, e.image, target, order)))
        against.append(float(a.clamp(max=0).abs().sum() / a.abs().sum().clamp(min=1e-12)))
    return {
        "images": len(images),
        "accuracy": right / len(images),
        "deletion_area": statistics.fmean(deletion),
        "random_order_area": statistics.fmean(random),
        "map_beats_random": statistics.fmean(
            float(d < r) for d, r in zip(deletion, random, strict=True)
        ),
        "share_against_answer": statistics.fmean(against),
    }


def draw(
    models: dict[str, LoadedModel],
    images: torch.Tensor,
    labels: torch.Tensor,
    out: Path,
    depth: int,
) -> None:
    plt = plots.pyplot()
    n = len(images)
    found = {
        kind: explain(m, images.numpy(), classes=1, maps_per_stage=0) for kind, m in models.items()
    }
    fig, axes = plt.subplots(3, n, figsize=(1.5 * n, 4.9))
    for col in range(n):
        image = images[col].numpy()
        axes[0, col].imshow(image, cmap="gray")
        true = models["plain"].class_names[int(labels[col])]
        axes[0, col].set_title(f"{true}", fontsize=8)
        for row, kind in enumerate(KINDS, start=1):
            e = found[kind][col]
            a = e.attributions[0]
            limit = float(a.abs().max()) or 1.0
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", alpha=0.35)
            ax.imshow(overlay(a, limit))
            name = models[kind].class_names[e.classes[0]]
            ax.set_title(f"{name} {e.probabilities[0]:.0%}", fontsize=8)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    axes[1, 0].set_ylabel(f"plain-{depth}", fontsize=9)
    axes[2, 0].set_ylabel(f"ResNet-{depth}", fontsize=9)
    fig.suptitle(
        "integrated gradients of each network's answer (red: for it, blue: against it)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("study", type=Path, help="the degradation study's folder")
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--shown", type=int, default=8, help="test images in the figure")
    p.add_argument("--measured", type=int, default=300, help="test images measured")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = {
        kind: load_model(args.study / f"{kind}-{args.depth}-s{args.seed}" / MODEL_FILE)
        for kind in KINDS
    }
    splits = data.load_data(
        DataConfig(dataset=models["plain"].data_config.dataset, data_dir=args.data_dir),
        log=lambda _: None,
    )
    images, labels = splits.test_images, splits.test_labels
    draw(models, images[: args.shown], labels[: args.shown], args.out, args.depth)
    results = {
        kind: measure(m, images[: args.measured], labels[: args.measured])
        for kind, m in models.items()
    }
    for kind, r in results.items():
        print(
            f"{kind}-{args.depth}: accuracy {r['accuracy']:.1%} on {r['images']} test images; "
            f"deletion area {r['deletion_area']:.3f} (random order {r['random_order_area']:.3f}, "
            f"map first on {r['map_beats_random']:.0%}); share of the map against the answer "
            f"{r['share_against_answer']:.0%}"
        )
    if args.json:
        record = {
            "study": str(args.study),
            "dataset": models["plain"].data_config.dataset,
            "depth": args.depth,
            "date": datetime.date.today().isoformat(),
            "integrated_gradients_steps": STEPS,
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
