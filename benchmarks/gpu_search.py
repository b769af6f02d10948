"""Recipe search on a borrowed GPU: many `mnist-resnet train` processes side by side until a
deadline, each judged on the validation split (test accuracy stored for the record only).

A GPU lent for minutes runs the same recipes as the CPU (same batch, schedule, augmentation;
bf16 autocast, data and augmentation on the device), so dozens of seeds of a CPU recipe fit in
one lease. Numerics differ from any CPU in the last digits, as between CPU kinds; the choice is
then confirmed on the CPU (docs/results.md).

    python3 benchmarks/gpu_search.py run benchmarks/gpu_search_jobs.txt --data DIR \\
        --deadline 450 --long 9 --short 6 --out results.json
    python3 benchmarks/gpu_search.py summary results.json [--json OUT]

Jobs file: one line per run, "POOL NAME-sSEED TRAIN-FLAGS...", POOL `long` or `short` (each pool
has its own number of slots, so short runs keep flowing beside long ones). Runs still going at
the deadline are killed and marked so; the results file is rewritten every 15 s, so a run of
the whole script cut short still leaves what finished.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

POOLS = ("long", "short")


def read_jobs(path: Path) -> dict[str, list[tuple[str, list[str]]]]:
    jobs: dict[str, list[tuple[str, list[str]]]] = {pool: [] for pool in POOLS}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pool, name, *args = shlex.split(line)
            jobs[pool].append((name, args))
    return jobs


def collect(runs: Path, ended: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each run's config, per-epoch metrics and result (if it finished), with its exit code."""
    found: dict[str, dict[str, Any]] = {}
    for name, info in ended.items():
        run: dict[str, Any] = dict(info)
        folder = runs / name
        metrics = folder / "metrics.jsonl"
        if metrics.exists():
            run["metrics"] = [json.loads(x) for x in metrics.read_text().splitlines() if x]
        for part in ("result", "config"):
            file = folder / f"{part}.json"
            if file.exists():
                run[part] = json.loads(file.read_text())
        log = runs / f"{name}.log"
        if log.exists():
            run["log_tail"] = log.read_text(errors="replace")[-1500:]
        found[name] = run
    return found


def run_jobs(args: argparse.Namespace) -> int:
    jobs = read_jobs(args.jobs)
    runs = Path(tempfile.mkdtemp(prefix="gpu-search-"))
    slots = {"long": args.long, "short": args.short}
    running: dict[str, tuple[str, subprocess.Popen[bytes], float, list[str]]] = {}
    ended: dict[str, dict[str, Any]] = {}
    start = time.monotonic()

    def write() -> None:
        out = {"elapsed_s": round(time.monotonic() - start, 1), "runs": collect(runs, ended)}
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, args.out)

    written = 0.0
    while running or any(jobs.values()):
        now = time.monotonic()
        for name, (pool, proc, began, flags) in list(running.items()):
            if proc.poll() is not None:
                wall = round(now - began, 1)
                ended[name] = {"pool": pool, "flags": flags, "rc": proc.returncode, "wall_s": wall}
                del running[name]
                print(f"[{now - start:5.0f}s] {name} ended ({proc.returncode})", flush=True)
        if now - start > args.deadline:
            for name, (pool, proc, _began, flags) in running.items():
                proc.kill()
                ended[name] = {"pool": pool, "flags": flags, "rc": "killed at the deadline"}
            left = [name for pool in POOLS for name, _ in jobs[pool]]
            print(f"deadline: killed {sorted(running)}, never started {left}", flush=True)
            break
        for pool in POOLS:
            while jobs[pool] and sum(p == pool for p, *_ in running.values()) < slots[pool]:
                name, flags = jobs[pool].pop(0)
                cmd = [sys.executable, "-m", "mnist_resnet", "train", *flags, "--threads", "1"]
                cmd += ["--data-dir", str(args.data), "--runs-dir", str(runs), "--name", name]
                with (runs / f"{name}.log").open("wb") as log:
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                running[name] = (pool, proc, now, flags)
                print(f"[{now - start:5.0f}s] {name}: {shlex.join(flags)}", flush=True)
        if now - written > 15:
            write()
            written = now
        time.sleep(0.5)
    write()
    return 0


def recipe_flags(flags: list[str]) -> str:
    """A run's flags without its seed: the recipe."""
    kept = [f for i, f in enumerate(flags) if f != "--seed" and flags[i - 1 : i] != ["--seed"]]
    return shlex.join(kept)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per recipe (the run name before -sSEED): validation error and test accuracy over seeds."""
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for name, run in results["runs"].items():
        if "result" in run:
            recipe, seed = name.rsplit("-s", 1)
            r = run["result"]
            groups[recipe].append(
                {
                    "seed": int(seed),
                    "best_val_error": r["best_val_error"],
                    "best_epoch": r["best_epoch"],
                    "test_accuracy": r["test_accuracy"],
                    "train_seconds": round(r["train_seconds"], 1),
                    "flags": run["flags"],
                }
            )
    table = {}
    for recipe, seeds in sorted(groups.items()):
        seeds.sort(key=lambda s: s["seed"])
        val = [100 * s["best_val_error"] for s in seeds]
        test = [100 * s["test_accuracy"] for s in seeds]
        table[recipe] = {
            "flags": recipe_flags(seeds[0]["flags"]),
            "seeds": len(seeds),
            "val_error_mean": round(statistics.mean(val), 3),
            "val_error_std": round(statistics.pstdev(val), 3),
            "test_accuracy_mean": round(statistics.mean(test), 3),
            "test_accuracy_median": round(statistics.median(test), 3),
            "test_accuracy_min": round(min(test), 2),
            "runs": seeds,
        }
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a jobs file until it is done or the deadline")
    r.add_argument("jobs", type=Path)
    r.add_argument("--data", type=Path, required=True, help="data root (MNIST/raw, ...)")
    r.add_argument("--deadline", type=float, default=450.0, help="seconds, then kill the rest")
    r.add_argument("--long", type=int, default=9, help="slots of the long pool")
    r.add_argument("--short", type=int, default=6, help="slots of the short pool")
    r.add_argument("--out", type=Path, default=Path("gpu-search.json"))
    s = sub.add_parser("summary", help="per recipe: validation error and test accuracy")
    s.add_argument("results", type=Path, nargs="+", help="files written by `run`")
    s.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    if args.command == "run":
        return run_jobs(args)
    merged: dict[str, Any] = {"runs": {}}
    for file in args.results:
        merged["runs"].update(json.loads(file.read_text())["runs"])
    table = summarize(merged)
    for recipe, t in table.items():
        print(
            f"{recipe:12s} {t['seeds']} seeds  val error {t['val_error_mean']:.3f}% "
            f"± {t['val_error_std']:.3f}  test {t['test_accuracy_median']:.2f}% median, "
            f"{t['test_accuracy_min']:.2f}% min  ({t['flags']})"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
