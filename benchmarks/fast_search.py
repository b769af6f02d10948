"""Recipe search for `--preset fast` (and any other preset): variants x seeds, judged on the
validation split only.

Each run is a whole `mnist-resnet train --preset P --seed S ARGS` process with one thread; `--jobs`
runs that many side by side (one per core: on small networks two one-thread processes do more
work than one two-thread process, and every run then sees the same kind of neighbour). Results
go to a JSON file that a re-run extends: finished (variant, seed) pairs are not run again.

    .venv/bin/python benchmarks/fast_search.py --seeds 1 2 3 4 5 --jobs 2 \\
        --variant base= --variant ep3="--epochs 3" --out benchmarks/results-fast-search.json

The summary ranks variants by mean validation error; test accuracy is stored for the record but
plays no part in the ranking. The run times here are one-thread times under a neighbour, not the
whole-command figure of the recipe (bench.py measures that, on an idle machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import machine  # noqa: E402


def run_one(
    preset: str, seed: int, args: list[str], data_dir: str | None, scratch: Path
) -> dict[str, Any]:
    name = f"s{seed}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "mnist_resnet", "train", "--preset", preset, "--seed", str(seed)]
    cmd += ["--threads", "1", "--runs-dir", str(scratch), "--name", name, *args]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return {"seed": seed, "failed": tail[0][:200]}
    result = json.loads((scratch / name / "result.json").read_text())
    return {
        "seed": seed,
        "best_val_error": result["best_val_error"],
        "best_epoch": result["best_epoch"],
        "test_accuracy": result["test_accuracy"],
        "train_seconds": result["train_seconds"],
        "wall_seconds": round(wall, 1),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return {"runs": 0}
    val = [r["best_val_error"] for r in ok]
    return {
        "runs": len(ok),
        "mean_val_error": statistics.fmean(val),
        "std_val_error": statistics.stdev(val) if len(val) > 1 else 0.0,
        "median_train_seconds": statistics.median(r["train_seconds"] for r in ok),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="fast")
    p.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME=ARGS",
        help='a name and the train flags it adds, e.g. ep3="--epochs 3" (base= for none)',
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=HERE / "results-fast-search.json")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the run folders (checkpoints) here, e.g. to study test-time averaging; "
        "by default they go to a temporary folder that is removed",
    )
    args = p.parse_args(argv)
    record: dict[str, Any] = {"variants": {}}
    if args.out.is_file():
        record = json.loads(args.out.read_text())
    record.update(
        preset=args.preset,
        note="ranked by mean validation error (5,000 held-out training images); test accuracy "
        "recorded, never used to choose; one thread per run, --jobs runs side by side",
        machine=machine(),
        updated=datetime.date.today().isoformat(),
    )
    todo = []
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        entry = record["variants"].setdefault(name, {"args": shlex.split(flags), "runs": []})
        if entry["args"] != shlex.split(flags):
            p.error(f"variant {name!r} is in {args.out} with other flags: {entry['args']}")
        have = {r["seed"] for r in entry["runs"] if "failed" not in r}
        todo += [(name, seed) for seed in args.seeds if seed not in have]
    with tempfile.TemporaryDirectory(prefix="fast-search-") as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)

        def go(job: tuple[str, int]) -> tuple[str, dict[str, Any]]:
            name, seed = job
            flags = record["variants"][name]["args"]
            return name, run_one(args.preset, seed, flags, args.data_dir, scratch)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for name, result in pool.map(go, todo):
                runs = record["variants"][name]["runs"]
                runs[:] = [r for r in runs if r["seed"] != result["seed"]] + [result]
                record["variants"][name]["summary"] = summary(runs)
                args.out.write_text(json.dumps(record, indent=1) + "\n")
                shown = result.get("failed") or (
                    f"val error {result['best_val_error']:.2%}, {result['train_seconds']:.1f} s"
                )
                print(f"{name} seed {result['seed']}: {shown}", flush=True)
    ranked = sorted(
        record["variants"].items(), key=lambda kv: kv[1].get("summary", {}).get("mean_val_error", 1)
    )
    for name, entry in ranked:
        s = entry.get("summary", {})
        if s.get("runs"):
            print(
                f"{name:24s} {s['runs']} runs  val error {s['mean_val_error']:.3%} "
                f"± {s['std_val_error']:.3%}  train {s['median_train_seconds']:.1f} s  "
                f"{' '.join(entry['args'])}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
