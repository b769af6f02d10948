"""The `fast` preset (or any recipe) on held-out seeds: the whole command's time and the test
accuracy, with the precision the probe chooses and with `--no-amp` (fp32), in turn.

The recipe was chosen on the validation split of seeds 1-10 (`fast_search.py`); these seeds
played no part in that, so their test accuracy is an honest estimate of what a user gets. Each
run is a separate `mnist-resnet train` process with every core (`bench.run_training`: wall time
without the per-epoch test passes it adds, and whether other processes kept the machine busy).

    .venv/bin/python benchmarks/fast_heldout.py --seeds 11 12 13 14 15 16 17 18 19 20 \\
        --data-dir ../shared/data --out benchmarks/results-fast-heldout.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import machine, run_training  # noqa: E402

from mnist_resnet.config import default_data_dir  # noqa: E402

PRECISIONS = {"probe": [], "fp32": ["--no-amp"]}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [r["final_test_accuracy"] for r in runs]
    wall = [r["wall_seconds"] for r in runs]
    return {
        "runs": len(runs),
        "median_test_accuracy": statistics.median(acc),
        "min_test_accuracy": min(acc),
        "max_test_accuracy": max(acc),
        "median_wall_seconds": statistics.median(wall),
        "max_wall_seconds": max(wall),
        "busy_runs": sum(r["machine_was_busy"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="fast")
    p.add_argument(
        "--args", default="", help='flags added to every run, e.g. "--max-shift 1" (a variant)'
    )
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(11, 21)))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--out", type=Path, default=HERE / "results-fast-heldout.json")
    args = p.parse_args(argv)
    report: dict[str, Any] = {
        "preset": args.preset,
        "args": args.args,
        "seeds": args.seeds,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "runs": {name: [] for name in args.precisions},
    }
    with tempfile.TemporaryDirectory(prefix="fast-heldout-") as tmp:
        for seed in args.seeds:
            # The precisions in turn, seed by seed, so that a drift of the machine's speed
            # touches both alike.
            for name in args.precisions:
                argv_ = ["--preset", args.preset, "--seed", str(seed), *shlex.split(args.args)]
                argv_ += PRECISIONS[name]
                run = run_training(argv_, args.data_dir, Path(tmp), f"{name}-s{seed}")
                run["seed"] = seed
                report["runs"][name].append(run)
                print(
                    f"{name} seed {seed}: test accuracy {run['final_test_accuracy']:.2%}, "
                    f"{run['wall_seconds']:.1f} s whole command ({run['precision'] or 'fp32'})"
                    + (" [machine busy]" if run["machine_was_busy"] else ""),
                    flush=True,
                )
                report["summary"] = {k: summary(v) for k, v in report["runs"].items() if v}
                args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, s in report["summary"].items():
        print(
            f"{name}: {s['runs']} seeds, test accuracy median {s['median_test_accuracy']:.2%}, "
            f"min {s['min_test_accuracy']:.2%}; whole command median "
            f"{s['median_wall_seconds']:.1f} s, max {s['max_wall_seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
