"""Accuracy benchmark: the `best` recipe over seeds and datasets, then ensembles of the seeds.

    make accuracy                                   # MNIST, Fashion-MNIST, KMNIST; seeds 1-3
    .venv/bin/python benchmarks/accuracy.py --datasets mnist --seeds 1    # one row, one seed

Each run is `python -m mnist_resnet train --preset best --dataset D --seed S` in a child process,
so its wall time includes start-up, data loading and the final test evaluation. A run whose
result.json already exists is collected, not repeated: an interrupted benchmark continues where
it stopped (and a killed run resumes from its last epoch checkpoint). A dataset that cannot be
obtained is reported as such, and the others go on.

The seeds of each dataset are then ensembled (softmax average) on the validation split and on
the test set, with and without test-time shifts; the validation numbers are the ones to choose
by. Writes benchmarks/results-accuracy.json and copies each run's config.json, metrics.jsonl and
result.json to benchmarks/accuracy-runs/NAME/, the files the table in docs/results.md is made of.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import _CHILD, machine

from mnist_resnet.config import DATASET_NAMES
from mnist_resnet.ensemble import ensemble

HERE = Path(__file__).resolve().parent
KEPT_FILES = ("config.json", "metrics.jsonl", "result.json", "wall_seconds.json")


def run_name(dataset: str, seed: int) -> str:
    return f"best-{dataset}-s{seed}"


def train_once(dataset: str, seed: int, data_dir: str, runs_dir: Path) -> dict[str, Any]:
    """Train (or resume, or just collect) one seed; returns its metrics or the error it met."""
    run = runs_dir / run_name(dataset, seed)
    if not (run / "result.json").is_file():
        cmd = [sys.executable, "-c", _CHILD, "train", "--preset", "best", "--dataset", dataset]
        cmd += ["--seed", str(seed), "--data-dir", data_dir, "--runs-dir", str(runs_dir)]
        cmd += ["--resume", str(run)] if (run / "config.json").is_file() else ["--name", run.name]
        print(f"$ mnist-resnet {' '.join(cmd[3:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - start
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0:
            return {"name": run.name, "error": lines[-2] if len(lines) > 1 else proc.stdout}
        peak = [int(x.split()[1]) / 1024 for x in lines if x.startswith("VmHWM_kB")]
        (run / "wall_seconds.json").write_text(
            json.dumps({"wall_seconds": wall, "peak_rss_mb": peak[0] if peak else None}) + "\n"
        )
    result = json.loads((run / "result.json").read_text())
    wall_file = run / "wall_seconds.json"
    timing = json.loads(wall_file.read_text()) if wall_file.is_file() else {}
    return {
        "name": run.name,
        "checkpoint": str(run / "best.pt"),
        "test_accuracy": result["test_accuracy"],
        "best_epoch": result["best_epoch"],
        "best_val_error": result["best_val_error"],
        "train_seconds": result["train_seconds"],
        "wall_seconds": timing.get("wall_seconds"),
        "peak_rss_mb": timing.get("peak_rss_mb"),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["test_accuracy"] for r in runs]
    walls = [r["wall_seconds"] for r in runs if r["wall_seconds"] is not None]
    return {
        "seeds": len(runs),
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "min": min(accs),
        "max": max(accs),
        "max_wall_seconds": max(walls) if walls else None,
        "median_wall_seconds": statistics.median(walls) if walls else None,
    }


def ensembles(runs: list[dict[str, Any]], data_dir: str) -> dict[str, dict[str, float]]:
    """Accuracy of the first 3 seeds' ensemble and of all seeds', on each split, +/- shifts."""
    found: dict[str, dict[str, float]] = {}
    for size in sorted({min(3, len(runs)), len(runs)}):
        members = [Path(r["checkpoint"]) for r in runs[:size]]
        scores = found[f"{size} models"] = {}

        def score(split: str, tta: bool, members: list[Path] = members) -> float:
            return ensemble(
                members, data_dir=Path(data_dir), split=split, tta=tta, log=lambda _: None
            ).accuracy

        # Validation decides whether test-time shifts are used; the test set only reports.
        scores["validation"] = score("validation", tta=False)
        scores["validation+tta"] = score("validation", tta=True)
        scores["test"] = score("test", tta=False)
        if scores["validation+tta"] > scores["validation"]:
            scores["test+tta"] = score("test", tta=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_RESNET_DATA", "data"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--out", type=Path, default=HERE / "results-accuracy.json")
    args = parser.parse_args()

    report: dict[str, Any] = {"machine": machine(), "recipe": "--preset best", "datasets": {}}
    if args.out.is_file():  # keep the datasets this invocation does not re-measure
        report["datasets"] = json.loads(args.out.read_text()).get("datasets", {})
    for dataset in args.datasets:
        runs = []
        for seed in args.seeds:
            runs.append(train_once(dataset, seed, args.data_dir, args.runs_dir))
            if "error" in runs[-1]:
                break  # missing data fails every seed the same way
        failed = [r for r in runs if "error" in r]
        entry: dict[str, Any] = {"runs": runs}
        if failed:
            entry["error"] = failed[0]["error"]
            print(f"{dataset}: not measured: {entry['error']}", flush=True)
        else:
            entry["summary"] = summarize(runs)
            if len(runs) > 1:
                entry["ensemble"] = ensembles(runs, args.data_dir)
            for r in runs:
                kept = HERE / "accuracy-runs" / r["name"]
                kept.mkdir(parents=True, exist_ok=True)
                for name in KEPT_FILES:
                    if (args.runs_dir / r["name"] / name).is_file():
                        shutil.copy2(args.runs_dir / r["name"] / name, kept / name)
            s = entry["summary"]
            print(
                f"{dataset}: test accuracy {s['mean']:.2%} +/- {s['std']:.2%} over "
                f"{s['seeds']} seeds (min {s['min']:.2%}), slowest run "
                f"{(s['max_wall_seconds'] or 0) / 60:.1f} min"
                + "".join(
                    f"; ensemble of {size}: {scores['test']:.2%}"
                    for size, scores in entry.get("ensemble", {}).items()
                ),
                flush=True,
            )
        report["datasets"][dataset] = entry
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after each dataset
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
