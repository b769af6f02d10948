"""Calibration and "not a digit" of the shipped models, measured on data the fit never saw.

    .venv/bin/python benchmarks/ood.py [--data-dir DIR] [--out benchmarks/results-ood.json]

For each shipped model: ECE (15 bins), NLL and Brier on its test set with the raw softmax and
with its stored temperature; then four out-of-distribution scores (maximum calibrated softmax,
energy, Mahalanobis on the penultimate features, and the shipped detector of `ood.py`), each
judged by AUROC and by the share of outliers caught when 1% of the model's own test images are
flagged, and the detector also at its stored cut-off (chosen on validation images). The judged
outliers were never used in any fit: the other dataset's test set, and letters rendered in the
Liberation fonts (the detector was fitted on DejaVu letters and synthetic scribbles). Typeset
digits in the same fonts are reported as well: those should *not* be flagged. Results:
docs/calibration.md. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_resnet import calibration, data, ood, posthoc, pretrained
from mnist_resnet.checkpoint import LoadedModel, load_model
from mnist_resnet.config import default_data_dir

JUDGE_FONTS = Path("/usr/share/fonts/truetype/liberation")
REPO = Path(__file__).resolve().parents[1]


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(score of an outlier > score of an inlier), ties counted half (Mann-Whitney U)."""
    scores = torch.cat([inside, outside]).double().numpy()
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    n_in, n_out = len(inside), len(outside)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def scores_of(
    loaded: LoadedModel, images: Any, gaussians: tuple[torch.Tensor, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each method's score (higher: more out of distribution), and the calibrated probabilities."""
    assert loaded.detector is not None
    logits, features = posthoc.logits_and_features(loaded, images, loaded.detector.taps)
    probs = loaded.calibration.apply(logits)
    means, precision = gaussians
    with torch.no_grad():
        detector = loaded.detector(features)
    return {
        "max_softmax": -probs.max(dim=1).values,
        "energy": -torch.logsumexp(logits, dim=1),
        "mahalanobis": ood.mahalanobis(features[-1].double(), means, precision).squeeze(1),
        "shipped_detector": detector,
    }, probs


def vector_scaling(logits: torch.Tensor, labels: torch.Tensor) -> Any:
    """softmax(logits * w + b), w and b per class, fitted by NLL with LBFGS from (1, 0)."""
    w = torch.ones(logits.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
    x = logits.double()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x * w + b, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lambda z: (z.double() * w.detach() + b.detach()).softmax(1)


def measure(name: str, data_dir: Path, other: str, log: Any) -> dict[str, Any]:
    loaded = load_model(pretrained.weights_path(name))
    if loaded.detector is None:
        raise SystemExit(
            f"{name} has no stored detector: run `mnist-resnet calibrate --pretrained {name}`"
        )
    splits = data.load_data(
        dataclasses.replace(loaded.data_config, data_dir=str(data_dir)), log=log
    )
    cfg = loaded.data_config
    train_x, train_y, val_x, val_y = data.split_validation(
        splits.train_images, splits.train_labels, cfg.val_size, cfg.split_seed
    )
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(posthoc.SEED))
    pick = pick[: posthoc.FIT_TRAIN_IMAGES].sort().values
    _, train_features = posthoc.logits_and_features(loaded, train_x[pick], loaded.detector.taps)
    gaussians = ood.class_gaussians(
        train_features[-1], train_y[pick].long(), len(loaded.class_names)
    )

    test_scores, test_probs = scores_of(loaded, splits.test_images, gaussians)
    labels = splits.test_labels.long()
    logits, _ = posthoc.logits_and_features(loaded, splits.test_images, ())
    val_logits, _ = posthoc.logits_and_features(loaded, val_x, ())
    result: dict[str, Any] = {
        "model": name,
        "temperature": loaded.temperature,
        "margin_power": loaded.calibration.margin_power,
        "calibration_fitted_on": loaded.calibration.fitted_on,
        "test": {
            "softmax": calibration.Measures.of(logits.softmax(1), labels).as_dict(),
            "calibrated": calibration.Measures.of(test_probs, labels).as_dict(),
            # The comparison: per-class scale and bias (Guo et al. 2017), also by NLL on the
            # validation split; it may change the ranking, so the accuracy can move.
            "vector_scaling": calibration.Measures.of(
                vector_scaling(val_logits, val_y.long())(logits), labels
            ).as_dict(),
            "median_top_probability": {
                "softmax": float(logits.softmax(1).max(1).values.median()),
                "calibrated": float(test_probs.max(1).values.median()),
            },
        },
    }
    threshold = loaded.detector.threshold
    flagged_inside = float((test_scores["shipped_detector"] > threshold).double().mean())
    unsure_inside = float((test_probs.max(1).values < ood.UNSURE_BELOW).double().mean())
    result["operating_point"] = {
        "threshold": threshold,
        "test_images_flagged": flagged_inside,
        "test_images_unsure": unsure_inside,
    }

    outsets: dict[str, tuple[Any, list[str] | None]] = {}
    other_splits = data.load(other, data_dir, log=log)
    outsets[f"{other} test"] = (other_splits.test_images, None)
    if JUDGE_FONTS.is_dir():
        fonts = sorted(JUDGE_FONTS.glob("*.ttf"))
        letters, shown = ood.rendered(string.ascii_letters, fonts)
        outsets["letters, Liberation fonts"] = (letters, shown)
        keep = [i for i, c in enumerate(shown) if c not in ood.DIGIT_LIKE]
        outsets["letters not like digits, Liberation fonts"] = (
            letters[keep],
            [shown[i] for i in keep],
        )
        digits, shown_digits = ood.rendered(string.digits, fonts)
        outsets["typeset digits, Liberation fonts (should not be flagged)"] = (
            digits,
            shown_digits,
        )
    else:
        log(f"{JUDGE_FONTS} missing: letters not judged (apt-get install fonts-liberation)")
    result["out_of_distribution"] = {}
    for set_name, (images, chars) in outsets.items():
        scores, _ = scores_of(loaded, images, gaussians)
        row: dict[str, Any] = {"images": len(images), "methods": {}}
        for method, inside in test_scores.items():
            cut = torch.quantile(inside.double(), 0.99)
            row["methods"][method] = {
                "auroc": auroc(inside, scores[method]),
                "caught_at_1pct_test_flagged": float(
                    (scores[method].double() > cut).double().mean()
                ),
            }
        caught = scores["shipped_detector"] > threshold
        row["shipped_detector_at_its_threshold"] = float(caught.double().mean())
        if chars is not None:
            per: dict[str, list[bool]] = {}
            for c, hit in zip(chars, caught.tolist(), strict=True):
                per.setdefault(c, []).append(hit)
            row["caught_per_character"] = {
                c: round(float(np.mean(v)), 3) for c, v in sorted(per.items())
            }
        result["out_of_distribution"][set_name] = row
        log(
            f"  {name} vs {set_name}: "
            + ", ".join(
                f"{m} AUROC {v['auroc']:.4f} / {v['caught_at_1pct_test_flagged']:.1%}"
                for m, v in row["methods"].items()
            )
            + f"; detector at its cut-off {row['shipped_detector_at_its_threshold']:.1%}"
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="data root (both datasets)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results-ood.json")
    parser.add_argument(
        "--without-letters",
        action="store_true",
        help="measure without the Liberation fonts: the results file then lacks the letter rows",
    )
    args = parser.parse_args()
    if not JUDGE_FONTS.is_dir() and not args.without_letters:
        # A results file without the letter rows must be asked for, not written by accident.
        print(
            f"ood.py: {JUDGE_FONTS} missing: apt-get install fonts-liberation "
            "(or --without-letters to measure without the letter sets)",
            file=sys.stderr,
        )
        return 2
    data_dir = args.data_dir or Path(default_data_dir())
    torch.manual_seed(0)
    results = []
    for name, other in (("mnist", "fashion-mnist"), ("fashion-mnist", "mnist")):
        results.append(measure(name, data_dir, other, lambda line: print(line, file=sys.stderr)))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    record = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "torch": torch.__version__,
        "command": "python benchmarks/ood.py",
        "unsure_below": ood.UNSURE_BELOW,
        "flag_rate_on_validation": ood.FLAG_RATE,
        "digit_like_letters": "".join(sorted(ood.DIGIT_LIKE)),
        "models": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
