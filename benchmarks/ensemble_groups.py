"""Averages of training runs packed into one model file, judged group by group.

The runs are split, in the order given, into disjoint groups of `--size`; each group is packed
into one model by `ensemble.pack` (what `ensemble --save` and `pretrained train` do) and measured:
its validation error (what chooses among the groups), its test accuracy in the precision its
members trained in, and in fp32 on the CPU (the figure a shipped file reports). Each member's
own figures come from its run. The summary gives mean and standard deviation over the groups
and over the single runs, and names the group with the fewest validation errors.

    .venv/bin/python benchmarks/ensemble_groups.py RUN_DIR... --size 3 \\
        --data-dir ../shared/data --out benchmarks/results-mnist-ensembles.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import machine  # noqa: E402

from mnist_resnet import data  # noqa: E402
from mnist_resnet.checkpoint import load_checkpoint, load_model  # noqa: E402
from mnist_resnet.config import default_data_dir  # noqa: E402
from mnist_resnet.ensemble import pack  # noqa: E402
from mnist_resnet.evaluate import evaluate_loaded  # noqa: E402
from mnist_resnet.precision import make_runtime  # noqa: E402


def run_record(run_dir: Path) -> dict[str, Any]:
    result = json.loads((run_dir / "result.json").read_text())
    state = load_checkpoint(run_dir / "best.pt")
    return {
        "run": run_dir.name,
        "seed": state["config"]["train"]["seed"],
        "bf16": state["config"]["train"]["amp"],
        "best_epoch": result["best_epoch"],
        "val_error": result["best_val_error"],
        "test_accuracy": result["test_accuracy"],
        "train_seconds": round(result["train_seconds"], 1),
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders, in group order")
    p.add_argument("--size", type=int, default=3, help="members per group")
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if len(args.runs) % args.size:
        p.error(f"{len(args.runs)} runs do not split into groups of {args.size}")
    runs = [run_record(r) for r in args.runs]
    groups = []
    fp32 = make_runtime(accel=False, amp=False, channels_last=False)
    read: dict[str, data.Splits] = {}  # each dataset read once, whatever the groups
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(args.runs), args.size):
            dirs = args.runs[start : start + args.size]
            out = Path(tmp) / f"group-{start}.pt"
            state = pack([d / "best.pt" for d in dirs], out, data_dir=args.data_dir, log=print)
            loaded = load_model(out)
            dataset = loaded.data_config.dataset
            if dataset not in read:
                read[dataset] = data.load_data(
                    dataclasses.replace(loaded.data_config, data_dir=str(args.data_dir)),
                    log=lambda _: None,
                )
            splits = read[dataset]
            test = evaluate_loaded(loaded, splits.test_images, splits.test_labels, fp32)
            groups.append(
                {
                    "seeds": [m["seed"] for m in state["members"]],
                    "val_error": state["best"]["val_error"],
                    "test_accuracy": state["test"]["accuracy"],
                    "fp32_cpu_test_accuracy": test.accuracy,
                }
            )
            print(groups[-1], flush=True)
    chosen = min(groups, key=lambda g: g["val_error"])
    report = {
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "size": args.size,
        "runs": runs,
        "groups": groups,
        "summary": {
            "single_runs_test_accuracy": spread([r["test_accuracy"] for r in runs]),
            "single_runs_val_error": spread([r["val_error"] for r in runs]),
            "groups_test_accuracy": spread([g["test_accuracy"] for g in groups]),
            "groups_fp32_cpu_test_accuracy": spread([g["fp32_cpu_test_accuracy"] for g in groups]),
            "groups_val_error": spread([g["val_error"] for g in groups]),
            "fewest_validation_errors": chosen["seeds"],
        },
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
