"""Which test-time views help a recipe: validation (and, for the record, test) errors of trained
checkpoints under each view set, the choice made on validation only.

The checkpoints come from `fast_search.py --keep DIR` (each run folder holds `best.pt`); each is
evaluated as trained (its batch norms folded, in the precision it trained in) with every view
set below, the model's own `average_views` doing the averaging:

    .venv/bin/python benchmarks/fast_search.py --seeds 1 2 3 4 5 6 7 8 9 10 --variant base= \\
        --keep /tmp/keep-fast --out /tmp/fast.json
    .venv/bin/python benchmarks/tta_views.py /tmp/keep-fast/* --recipe fast \\
        --data-dir ../shared/data --out benchmarks/results-tta-views.json

A re-run with another --recipe adds to the same file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import machine  # noqa: E402

from mnist_resnet import data  # noqa: E402
from mnist_resnet.checkpoint import load_model  # noqa: E402
from mnist_resnet.config import default_data_dir  # noqa: E402
from mnist_resnet.inference import predict_logits  # noqa: E402
from mnist_resnet.model import VIEWS, View  # noqa: E402
from mnist_resnet.precision import make_runtime  # noqa: E402

# The named settings, and three more sets that were candidates for one.
VIEW_SETS: dict[str, tuple[View, ...]] = {
    "none": VIEWS["none"],
    "shift-x": VIEWS["shift-x"],
    "shift-y (3 views)": ((0, 0, False), (1, 0, False), (-1, 0, False)),
    "shift": VIEWS["shift"],
    "diagonal (5 views)": (
        (0, 0, False),
        (1, 1, False),
        (-1, -1, False),
        (1, -1, False),
        (-1, 1, False),
    ),
    "all nine shifts": tuple((dy, dx, False) for dy in (0, 1, -1) for dx in (0, 1, -1)),
}


def errors(run: Path, data_dir: str) -> dict[str, Any]:
    """Validation and test errors (counts) of one run's best.pt under every view set."""
    loaded = load_model(run / "best.pt")
    cfg = dataclasses.replace(loaded.data_config, data_dir=data_dir)
    splits = data.load_data(cfg, log=lambda _: None)
    _, _, val_x, val_y = data.split_validation(
        splits.train_images, splits.train_labels, cfg.val_size, cfg.split_seed
    )
    runtime = make_runtime(accel=False, amp=bool(loaded.trained_amp), channels_last=True)
    model = runtime.prepare_model(loaded.model)
    seed = json.loads((run / "config.json").read_text())["train"]["seed"]
    row: dict[str, Any] = {"run": run.name, "seed": seed, "validation": {}, "test": {}}
    for name, views in VIEW_SETS.items():
        model.views = views
        for split, x, y in (
            ("validation", val_x, val_y),
            ("test", splits.test_images, splits.test_labels),
        ):
            logits = predict_logits(model, x, mean=loaded.mean, std=loaded.std, runtime=runtime)
            row[split][name] = int((logits.argmax(1) != y).sum())
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="run folders, each with best.pt")
    p.add_argument("--recipe", required=True, help="the name the rows are filed under")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results-tta-views.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = []
    for run in sorted(args.runs):
        rows.append(errors(run, args.data_dir))
        print(run.name, rows[-1]["validation"], flush=True)
    totals = {
        split: {name: sum(r[split][name] for r in rows) for name in VIEW_SETS}
        for split in ("validation", "test")
    }
    record.setdefault("recipes", {})[args.recipe] = {
        "runs": rows,
        "summed_errors": totals,
        "note": "errors summed over the runs (5,000 validation and 10,000 test images each); "
        "the view set is chosen on validation only",
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for name in VIEW_SETS:
        val, test = totals["validation"][name], totals["test"][name]
        print(f"{name:20s} validation {val:4d} ({val / 50 / len(rows):.3f}%)  test {test:4d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
