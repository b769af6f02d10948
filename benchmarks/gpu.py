"""The GPU check of issue 22, run by benchmarks/gpu.sh (read its header for how to call it).

Parts, in this order, each written to the JSON as soon as it is done (so a run cut short
still leaves what it measured):
1. the bf16 matmul peak of the device (the denominator of MFU);
2. throughput of ResNet-20 and of the `fast-gpu` network: the trainer's step (device-side
   augmentation plus `train_step`, as a device-resident epoch runs it) and evaluation of the
   folded network, images/s and MFU; ResNet-20 again with cudnn.benchmark on, and compiled
   with --compile;
3. the CPU path: ResNet-20's training step on this machine's CPU (fp32, channels_last,
   batch 128, as `make bench` measures it), for the GPU/CPU ratio;
4. `train --preset fast-gpu`, one process per seed, whole command timed; then the same recipe
   once with --no-device-data (the previous host-data path, for its ratio);
5. `train --preset best-gpu`, one process per seed.

Training and evaluation FLOPs are counted as in benchmarks/bench.py: forward matmul/conv FLOPs
per image (`model.flops_per_image`), three times that for a training step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from mnist_resnet import data  # noqa: E402
from mnist_resnet.config import DataConfig, ModelConfig, TrainConfig, preset  # noqa: E402
from mnist_resnet.images import to_float  # noqa: E402
from mnist_resnet.model import build_model, flops_per_image, folded_copy  # noqa: E402
from mnist_resnet.optim import make_optimizer  # noqa: E402
from mnist_resnet.runtime import Runtime  # noqa: E402
from mnist_resnet.step import train_step  # noqa: E402

MNIST_GZ = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# The targets on one H200.
FAST_ACCURACY, FAST_TRAIN_S, FAST_WALL_S = 0.995, 2.0, 10.0
BEST_ACCURACY, BEST_TRAIN_S = 0.9975, 60.0
TARGET_TRAIN_IPS, TARGET_EVAL_IPS = 150_000, 500_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        default=os.environ.get("MNIST_DATA") or os.environ.get("MNIST_RESNET_DATA"),
        help="a data root holding MNIST/raw/, or a folder with the four MNIST .gz files "
        "(default: $MNIST_DATA, else $MNIST_RESNET_DATA)",
    )
    p.add_argument("--dry-run", action="store_true", help="tiny settings, CPU allowed")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--fast-args", default="", help="extra flags for the fast-gpu runs")
    p.add_argument("--best-args", default="", help="extra flags for the best-gpu runs")
    p.add_argument("--skip-best", action="store_true", help="leave out the best-gpu runs")
    p.add_argument("--compile", action="store_true", help="also time ResNet-20 compiled")
    p.add_argument("--window", type=float, default=1.0, help="seconds per throughput window")
    p.add_argument(
        "--budget-s",
        type=float,
        default=340.0,
        help="stop starting training runs once the check has run this long (default: %(default)s)",
    )
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results-gpu.json)")
    args = p.parse_args(argv)
    if not args.data:
        p.error("give the MNIST data with --data DIR (or $MNIST_DATA)")
    return args


def fail(message: str) -> int:
    print(f"gpu.sh: {message}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- data


def data_root(given: Path, scratch: Path) -> Path:
    """A data root in torchvision's layout: `given` itself, or one built of links to its .gz."""
    if (given / "MNIST" / "raw").is_dir():
        return given
    if all((given / name).is_file() for name in MNIST_GZ):
        raw = scratch / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in MNIST_GZ:
            link = raw / name
            if not link.exists():
                link.symlink_to((given / name).resolve())
        return scratch / "data"
    raise FileNotFoundError(
        f"{given} holds neither MNIST/raw/ nor the four MNIST .gz files ({', '.join(MNIST_GZ)})"
    )


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rates(
    fn: Callable[[], object], device: torch.device, seconds: float, repeats: int
) -> list[float]:
    """Calls per second of `fn` in `repeats` windows, each closed by waiting for the device (the
    host only queues work on a GPU: the window ends when the device has done it)."""
    for _ in range(3):  # first calls pick kernels and allocate: not counted
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(5):
                fn()
            calls += 5
        sync(device)
        out.append(calls / (time.perf_counter() - start))
    return out


def matmul_peak(device: torch.device, n: int, seconds: float) -> dict[str, float]:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    measured = rates(lambda: torch.mm(a, b, out=out), device, seconds, 3)
    return {"size": n, "flops_per_s": max(measured) * 2 * n**3}


def step_throughput(
    model_cfg: ModelConfig,
    runtime: Runtime,
    *,
    batches: list[int],
    eval_batches: list[int],
    seconds: float,
    peak: float,
    compile_model: bool = False,
) -> dict[str, Any]:
    """Images/s of the trainer's device-resident step (augment + train_step) and of evaluating
    the folded network, on random uint8 images that live on the device."""
    device = runtime.device
    torch.manual_seed(0)
    model = runtime.prepare_model(build_model(model_cfg))
    flops = flops_per_image(model)
    forward: torch.nn.Module = torch.compile(model) if compile_model else model  # type: ignore[assignment]
    optimizer = make_optimizer(model, TrainConfig())
    data_cfg = DataConfig()  # the default augmentation: shifts of up to 2 pixels
    pool = torch.randint(0, 256, (max(batches + eval_batches) * 2, 1, 28, 28), dtype=torch.uint8)
    pool = pool.to(device)
    labels = torch.randint(0, 10, (len(pool),), device=device)
    generator = data.augment_generator(device, 0)
    result: dict[str, Any] = {"forward_flops_per_image": flops, "train": {}, "eval": {}}
    compile_start = time.perf_counter()
    calls = [0]

    def step(b: int) -> None:
        # Two batches in turn from the device-resident pool, as an epoch cuts them.
        i = calls[0] % 2 * b
        calls[0] += 1
        images = data.training_batch(pool[i : i + b], data_cfg, generator, 0.1307, 0.3081)
        train_step(forward, images, labels[i : i + b], optimizer, runtime, check_finite=False)

    def infer(b: int) -> None:
        with torch.inference_mode(), runtime.autocast():
            folded(runtime.prepare_input(to_float(pool[:b], 0.1307, 0.3081)))

    forward.train()
    if compile_model:  # the compile happens in the first call: timed apart from the windows
        step(batches[0])
        sync(device)
        result["compile_and_first_step_s"] = time.perf_counter() - compile_start
    for b in batches:
        ips = [r * b for r in rates(lambda b=b: step(b), device, seconds, 2)]
        result["train"][str(b)] = {
            "images_per_s": max(ips),
            "mfu": 3 * flops * max(ips) / peak,
        }
    folded = runtime.prepare_model(folded_copy(model))
    if compile_model:
        folded = torch.compile(folded)  # type: ignore[assignment]
    folded.eval()
    for b in eval_batches:
        ips = [r * b for r in rates(lambda b=b: infer(b), device, seconds, 2)]
        result["eval"][str(b)] = {"images_per_s": max(ips), "mfu": flops * max(ips) / peak}
    return result


def cpu_train_throughput(seconds: float) -> dict[str, Any]:
    """ResNet-20's training step on this machine's CPU, as `make bench` measures it."""
    cpu = torch.device("cpu")
    runtime = Runtime(cpu, None, True)
    torch.manual_seed(0)
    model = runtime.prepare_model(build_model(ModelConfig(depth=20)))
    optimizer = make_optimizer(model, TrainConfig())
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    measured = rates(lambda: train_step(model, x, y, optimizer, runtime), cpu, seconds, 2)
    return {
        "images_per_s": max(measured) * 128,
        "threads": torch.get_num_threads(),
        "setting": "fp32, channels_last, batch 128",
    }


# ----------------------------------------------------------------------------- recipe runs


def run_recipe(
    argv: list[str], root: Path, runs: Path, name: str, timeout: float
) -> dict[str, Any]:
    """One `mnist-resnet train` as its own process: the whole command timed from outside."""
    cmd = [sys.executable, "-m", "mnist_resnet", "train", *argv]
    cmd += ["--data-dir", str(root), "--runs-dir", str(runs), "--name", name]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    )
    shown = "train " + " ".join(argv)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"command": shown, "error": f"stopped after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1]
        return {"command": shown, "error": f"exit {proc.returncode}: {last}"}
    run = runs / name
    result = json.loads((run / "result.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "command": shown,
        "wall_seconds": wall,
        "train_seconds": result["train_seconds"],
        "test_accuracy": result["test_accuracy"],
        "best_epoch": result["best_epoch"],
        "epoch_images_per_s": [r["images_per_second"] for r in rows],
        "first_line": proc.stdout.splitlines()[0] if proc.stdout else "",
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"runs": len(runs), "ok": 0}

    def stats(key: str) -> dict[str, float]:
        values = [float(r[key]) for r in ok]
        return {
            "median": statistics.median(values),
            "mean": statistics.fmean(values),
            "min": min(values),
            "max": max(values),
        }

    epochs = min(len(r["epoch_images_per_s"]) for r in ok)
    return {
        "runs": len(runs),
        "ok": len(ok),
        "test_accuracy": stats("test_accuracy"),
        "train_seconds": stats("train_seconds"),
        "wall_seconds": stats("wall_seconds"),
        "epoch_images_per_s_median": [
            statistics.median(r["epoch_images_per_s"][e] for r in ok) for e in range(epochs)
        ],
    }


# ----------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _flops(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.1f} GFLOP/s"


def _pct(x: float) -> str:
    return f"{x:.2%}"


def _range(s: dict[str, float], fmt: Callable[[float], str], centre: str = "median") -> str:
    return f"{fmt(s[centre])} ({fmt(s['min'])}-{fmt(s['max'])})"


def recipe_row(label: str, s: dict[str, Any], centre: str, target: str, met: bool | None) -> str:
    if not s.get("ok"):
        return f"| {label} | failed | | | | {target} |"
    acc = _range(s["test_accuracy"], _pct, centre) + f" {centre}"
    train = _range(s["train_seconds"], lambda v: f"{v:.2f} s")
    wall = _range(s["wall_seconds"], lambda v: f"{v:.1f} s")
    ips = " / ".join(f"{v:,.0f}" for v in s["epoch_images_per_s_median"])
    verdict = "" if met is None else (": met" if met else ": not met")
    return f"| {label} | {acc} | {train} | {wall} | {ips} | {target}{verdict} |"


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print()
    print(f"# GPU check, {m['date']}: {m.get('gpu', m['device'])}, torch {m['torch']}")
    peak = report.get("matmul_peak")
    if peak:
        print(f"bf16 matmul peak ({peak['size']}x{peak['size']}): {_flops(peak['flops_per_s'])}")
    recipes = report.get("recipes", {})
    if recipes:
        print()
        print(
            "| command | test acc. (seeds) | training | whole command | img/s (epochs) | target |"
        )
        print("|---|---|---|---|---|---|")
        fast = recipes.get("fast-gpu")
        if fast:
            s = fast["summary"]
            met = None
            if s.get("ok") == s.get("runs") and not report["dry_run"]:
                met = (
                    s["test_accuracy"]["median"] >= FAST_ACCURACY
                    and s["train_seconds"]["median"] <= FAST_TRAIN_S
                    and s["wall_seconds"]["median"] <= FAST_WALL_S
                )
            target = f">= {FAST_ACCURACY:.1%} median, <= {FAST_TRAIN_S:g} s, <= {FAST_WALL_S:g} s"
            print(recipe_row(f"`{fast['command']}`", s, "median", target, met))
        host = recipes.get("fast-gpu-host-data")
        if host:
            s = host["summary"]
            ratio = ""
            if s.get("ok") and fast and fast["summary"].get("ok"):
                r = s["train_seconds"]["median"] / fast["summary"]["train_seconds"]["median"]
                ratio = f"previous host-data path: {r:.2f}x the device path's training time"
            print(recipe_row(f"`{host['command']}`", s, "median", ratio, None))
        best = recipes.get("best-gpu")
        if best:
            s = best["summary"]
            met = None
            if s.get("ok") == s.get("runs") and not report["dry_run"]:
                met = (
                    s["test_accuracy"]["mean"] >= BEST_ACCURACY
                    and s["train_seconds"]["max"] <= BEST_TRAIN_S
                )
            target = f">= {BEST_ACCURACY:.2%} mean, <= {BEST_TRAIN_S:g} s each"
            print(recipe_row(f"`{best['command']}`", s, "mean", target, met))
        for r in [r for rec in recipes.values() for r in rec["runs"] if "error" in r]:
            print(f"failed: {r['command']}: {r['error']}")
    tp = report.get("throughput", {})
    if tp:
        print()
        print(
            "| network, setting | train img/s (batch) | train MFU | eval img/s (batch) | eval MFU |"
        )
        print("|---|---|---|---|---|")
        for label, t in tp.items():
            tr = max(t["train"].items(), key=lambda kv: kv[1]["images_per_s"])
            ev = max(t["eval"].items(), key=lambda kv: kv[1]["images_per_s"])
            print(
                f"| {label} | {tr[1]['images_per_s']:,.0f} ({tr[0]}) | {tr[1]['mfu']:.2%} | "
                f"{ev[1]['images_per_s']:,.0f} ({ev[0]}) | {ev[1]['mfu']:.2%} |"
            )
        r20 = tp.get("ResNet-20")
        if r20 and not report["dry_run"]:
            train_best = max(v["images_per_s"] for v in r20["train"].values())
            eval_best = max(v["images_per_s"] for v in r20["eval"].values())
            met_train = "met" if train_best >= TARGET_TRAIN_IPS else "not met"
            met_eval = "met" if eval_best >= TARGET_EVAL_IPS else "not met"
            print(
                f"ResNet-20 targets: training >= {TARGET_TRAIN_IPS:,} img/s ({met_train}), "
                f"evaluation >= {TARGET_EVAL_IPS:,} img/s ({met_eval})"
            )
    cpu = report.get("cpu_path")
    if cpu and tp.get("ResNet-20"):
        gpu_best = max(v["images_per_s"] for v in tp["ResNet-20"]["train"].values())
        print(
            f"CPU path: ResNet-20 training step on this machine's CPU ({cpu['threads']} threads, "
            f"{cpu['setting']}): {cpu['images_per_s']:,.0f} img/s; the GPU step trains "
            f"{gpu_best / cpu['images_per_s']:,.3g}x as many images per second"
        )
    print(f"whole check: {report.get('seconds', 0):.0f} s; results in {report['out']}")


def write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        return fail(
            f"no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is "
            "False); run it on a machine with one, or pass --dry-run for a CPU smoke test"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.gettempdir()) / "mnist-resnet-gpu-dry-run.json"
    else:
        out = HERE / "results-gpu.json"
    scratch = Path(tempfile.mkdtemp(prefix="mnist-resnet-gpu-"))
    try:
        root = data_root(Path(args.data), scratch)
        # Decompressed and verified once, so that no timed run pays for it.
        data.prepare_data(DataConfig(data_dir=str(root)), log=lambda line: print(line))
    except (OSError, data.DataError) as e:
        return fail(f"MNIST data: {e}")
    dry = args.dry_run
    report: dict[str, Any] = {
        "machine": machine(device),
        "dry_run": dry,
        "out": str(out),
        "data_root": str(root),
    }
    seconds = 0.1 if dry else args.window
    # 1. the bf16 matmul peak: MFU's denominator.
    report["matmul_peak"] = matmul_peak(device, 512 if dry else 8192, seconds)
    peak = report["matmul_peak"]["flops_per_s"]
    print(f"bf16 matmul peak: {_flops(peak)}", flush=True)
    write(report, out)
    # 2. throughput on the device, bf16 autocast and channels_last as `train` runs there.
    runtime = Runtime(device, torch.bfloat16, True)
    batches, eval_batches = ([16], [32]) if dry else ([256, 512, 1024], [1000, 5000])
    variants: list[tuple[str, ModelConfig, dict[str, Any]]] = [
        ("ResNet-20", ModelConfig(depth=20), {}),
        ("fast-gpu network", preset("fast-gpu").model, {}),
    ]
    report["throughput"] = {}
    for label, model_cfg, extra in variants:
        report["throughput"][label] = step_throughput(
            model_cfg,
            runtime,
            batches=batches,
            eval_batches=eval_batches,
            seconds=seconds,
            peak=peak,
            **extra,
        )
        print(f"throughput: {label} done", flush=True)
        write(report, out)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # cuDNN times its kernels per shape once
        report["throughput"]["ResNet-20, cudnn.benchmark"] = step_throughput(
            ModelConfig(depth=20),
            runtime,
            batches=[512],
            eval_batches=[5000],
            seconds=seconds,
            peak=peak,
        )
        torch.backends.cudnn.benchmark = False
        write(report, out)
    if args.compile:
        report["throughput"]["ResNet-20, torch.compile"] = step_throughput(
            ModelConfig(depth=20),
            runtime,
            batches=batches[-1:],
            eval_batches=eval_batches[-1:],
            seconds=seconds,
            peak=peak,
            compile_model=True,
        )
        write(report, out)
    # 3. the CPU path, for the ratio.
    report["cpu_path"] = cpu_train_throughput(seconds)
    print(f"CPU path: {report['cpu_path']['images_per_s']:,.0f} img/s", flush=True)
    write(report, out)
    # 4-5. the recipes, each run a process of its own, timed whole.
    tiny = [
        "--dry-run",
        "--subset",
        "0.02",
        "--test-batch-size",
        "100",
        "--no-amp",
        "--device-data",
    ]
    smoke = tiny if dry else []
    plans = [
        ("fast-gpu", ["--preset", "fast-gpu", *shlex.split(args.fast_args)], args.seeds, 120.0),
        (
            "fast-gpu-host-data",
            ["--preset", "fast-gpu", "--no-device-data", *shlex.split(args.fast_args)],
            args.seeds[:1],
            120.0,
        ),
    ]
    if not args.skip_best:
        best = ["--preset", "best-gpu", *shlex.split(args.best_args)]
        plans.append(("best-gpu", best, args.seeds, 180.0))
    runs = scratch / "runs"
    report["recipes"] = {}
    for key, recipe_argv, seeds, timeout in plans:
        if dry and key == "fast-gpu-host-data":
            smoke_argv = [a for a in smoke if a != "--device-data"]
        else:
            smoke_argv = smoke
        results: list[dict[str, Any]] = []
        for seed in seeds:
            argv = [*recipe_argv, "--seed", str(seed), *smoke_argv]
            # Within the whole check's time: a run that would overrun it is cut (and reported).
            left = args.budget_s - (time.perf_counter() - start)
            if left < 15:
                shown = "train " + " ".join(argv)
                results.append({"command": shown, "error": "not run: --budget-s is spent"})
            else:
                limit = min(timeout, left)
                results.append(run_recipe(argv, root, runs, f"{key}-s{seed}", limit))
            r = results[-1]
            note = r.get("error") or (
                f"{r['test_accuracy']:.2%}, training {r['train_seconds']:.2f} s, "
                f"whole command {r['wall_seconds']:.1f} s"
            )
            print(f"{key} seed {seed}: {note}", flush=True)
            report["recipes"][key] = {
                "command": "train " + " ".join(recipe_argv),
                "runs": results,
                "summary": summary(results),
            }
            report["seconds"] = time.perf_counter() - start
            write(report, out)
    report["runs_dir"] = str(runs)
    report["seconds"] = time.perf_counter() - start
    write(report, out)
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
