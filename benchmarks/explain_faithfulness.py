"""Are the attribution maps faithful? Deletion and insertion curves of the shipped models.

    .venv/bin/python benchmarks/explain_faithfulness.py [--images 500] [--data-dir DIR]
        [--out benchmarks/results-explain.json]

For each shipped model and each of the first N test images, the predicted class's calibrated
probability as the image's ink pixels are removed (deletion) or put back on a blank image
(insertion) in the order a method ranks them, most important first (Petsiuk et al. 2018).
A faithful map makes the deletion curve fall fast (small area) and the insertion curve rise fast
(large area). Methods: integrated gradients (`explain`, 64 steps), the plain gradient
(saliency, Simonyan et al. 2014, |d logit / d pixel|), and a random order (the baseline every
map must beat). Results: docs/degradation.md#what-the-network-looks-at.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from captum.attr import Saliency

from mnist_resnet import data, explain, pretrained
from mnist_resnet.checkpoint import load_model
from mnist_resnet.config import default_data_dir

REPO = Path(__file__).resolve().parents[1]


def measure(name: str, count: int, data_dir: Path, seed: int) -> dict[str, object]:
    loaded = load_model(pretrained.weights_path(name))
    splits = data.load(loaded.data_config.dataset, data_dir, log=lambda _: None)
    images = splits.test_images[:count].numpy()
    g = torch.Generator().manual_seed(seed)
    areas: dict[str, dict[str, list[float]]] = {
        m: {"deletion": [], "insertion": []} for m in ("integrated_gradients", "saliency", "random")
    }
    started = time.perf_counter()
    explained = []
    for start in range(0, count, 50):
        explained += explain.explain(
            loaded, images[start : start + 50], classes=1, maps_per_stage=0
        )
    ig_seconds = (time.perf_counter() - started) / count
    saliency = Saliency(loaded.model.eval())
    for e in explained:
        x = explain._inputs(loaded, e.image).requires_grad_()
        with torch.enable_grad():
            grad = saliency.attribute(x, target=e.classes[0], abs=True).detach()[0, 0]
        orders = {
            "integrated_gradients": explain.attribution_order(e.attributions[0]),
            "saliency": explain.attribution_order(grad),
            "random": torch.randperm(e.image.size, generator=g),
        }
        for method, order in orders.items():
            for kind in ("deletion", "insertion"):
                curve = explain.deletion_curve(
                    loaded, e.image, e.classes[0], order, insert=kind == "insertion"
                )
                areas[method][kind].append(explain.area(curve))
    summary = {
        method: {
            kind: {"mean_area": float(np.mean(v)), "std_area": float(np.std(v))}
            for kind, v in kinds.items()
        }
        for method, kinds in areas.items()
    }
    ig, rnd = areas["integrated_gradients"], areas["random"]
    return {
        "model": name,
        "images": count,
        "steps": explain.STEPS,
        "methods": summary,
        "integrated_gradients_beats_random": {
            "deletion": float(np.mean(np.array(ig["deletion"]) < np.array(rnd["deletion"]))),
            "insertion": float(np.mean(np.array(ig["insertion"]) > np.array(rnd["insertion"]))),
        },
        "integrated_gradients_seconds_per_image": ig_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results-explain.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for name in pretrained.NAMES:
        r = measure(name, args.images, args.data_dir, args.seed)
        results.append(r)
        m = r["methods"]
        assert isinstance(m, dict)
        print(
            f"{name}: deletion area (lower is faithful) "
            + ", ".join(f"{k} {v['deletion']['mean_area']:.3f}" for k, v in m.items())
            + "; insertion area (higher) "
            + ", ".join(f"{k} {v['insertion']['mean_area']:.3f}" for k, v in m.items()),
            flush=True,
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    record = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "command": "python benchmarks/explain_faithfulness.py " + " ".join(argv or sys.argv[1:]),
        "models": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
