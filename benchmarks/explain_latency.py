"""Time per update of the draw page's overlay: POST /explain of the page's own request (a
280x280 PNG of a drawn "7", 18 px pen, white on black, as the canvas sends it) against the real
`mnist-resnet serve` pinned to one core with one thread (issue 33: <= 150 ms per update for the
shipped model); /predict of the same request beside it, and the server's explainer alone
(`explain.explain` on its copy of the network, on the same core) for where the time goes.

    .venv/bin/python benchmarks/explain_latency.py [--repeats 100] [--core 1]

The server runs under `taskset -c CORE`, the client on the other cores. The three are timed in
turn, one of each per round, so a change in the machine's other load reaches all three alike;
beside the wall time, the CPU time each took (the server's, or the explainer thread's), which
other work sharing the core does not stretch. Prints the medians and writes
benchmarks/results-explain-latency.json with the CPU, the load average before and after (other
work on the machine shows there) and the commit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image, ImageDraw

from mnist_resnet import pretrained
from mnist_resnet.images import prepare_image
from mnist_resnet.runtime import return_freed_memory
from mnist_resnet.serve import Explainer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The browser test's "7" (offsets from the centre of the 280x280 canvas), drawn with the page's
# default 18 px pen.
SEVEN = [(-60, -90), (60, -90), (0, 0), (-25, 100)]
PEN = 18
WARM_UP = 5


def canvas_png() -> bytes:
    img = Image.new("RGB", (280, 280), "black")
    points = [(140 + x, 140 + y) for x, y in SEVEN]
    ImageDraw.Draw(img).line(points, fill="white", width=PEN, joint="curve")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    family, model = fields.get("CPU family", "").strip(), fields.get("Model", "").strip()
    return f"{name} (family {family}, model {model})" if family and model else name


def _tree_cpu_ns(pid: int) -> int:
    """CPU time so far of a process, its threads and its descendants' (Granian's worker), in ns
    (the scheduler's own count: /proc/PID/task/TID/schedstat)."""
    total, todo = 0, [pid]
    while todo:
        tasks = Path(f"/proc/{todo.pop()}/task")
        try:
            for task in tasks.iterdir():
                total += int((task / "schedstat").read_text().split()[0])
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # a thread or process that ended meanwhile
    return total


@contextmanager
def served(model: str, core: int) -> Iterator[tuple[httpx.Client, int]]:
    """`mnist-resnet serve --pretrained MODEL` on `core`, one worker, one thread, once ready:
    a client, and the server's process id."""
    port = _free_port()
    argv = [sys.executable, "-m", "mnist_resnet", "serve", "--pretrained", model]
    argv += ["--port", str(port), "--threads", "1", "--workers", "1"]
    proc = subprocess.Popen(
        ["taskset", "-c", str(core), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("error: the server did not become ready")
                time.sleep(0.2)
            yield client, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _stats(ms: list[float], cpu_ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {
        "median_ms": round(statistics.median(ms), 1),
        "p10_ms": round(ms[len(ms) // 10], 1),
        "p90_ms": round(ms[(9 * len(ms)) // 10], 1),
        "min_ms": round(ms[0], 1),
        "cpu_median_ms": round(statistics.median(cpu_ms), 1),
    }


def measure(model: str, core: int, repeats: int) -> dict[str, Any]:
    payload = canvas_png()
    others = set(os.sched_getaffinity(0)) - {core} or {core}
    torch.set_num_threads(1)
    return_freed_memory()  # the server's malloc setting, which its explainer runs under
    explainer = Explainer(pretrained.weights_path(model))
    preparation = explainer.loaded.data_config.preparation
    image = prepare_image(Image.open(io.BytesIO(payload)).convert("RGB"), preparation)[None]
    answers: dict[str, httpx.Response] = {}

    def post(client: httpx.Client, path: str) -> Callable[[], None]:
        def run() -> None:
            answer = client.post(path, files={"file": ("canvas.png", payload, "image/png")})
            answer.raise_for_status()
            answers[path] = answer

        return run

    def alone() -> None:
        os.sched_setaffinity(0, {core})  # this thread only: the server's core, while it idles
        try:
            explainer.explain(image)
        finally:
            os.sched_setaffinity(0, others)

    names = ("explain", "predict", "explainer_alone")
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    os.sched_setaffinity(0, others)  # the client stays off the server's core
    with served(model, core) as (client, pid):
        # CPU time, beside the wall time that other work on the core stretches: the server's
        # whole process tree for a request, this thread for the explainer alone.
        server_cpu = lambda: _tree_cpu_ns(pid) / 1e6  # noqa: E731
        thread_cpu = lambda: time.thread_time_ns() / 1e6  # noqa: E731
        steps = {
            "explain": (post(client, "/explain"), server_cpu),
            "predict": (post(client, "/predict"), server_cpu),
            "explainer_alone": (alone, thread_cpu),
        }
        for i in range(WARM_UP + repeats):
            for name, (step, cpu_now) in steps.items():
                cpu_before, started = cpu_now(), time.perf_counter()
                step()
                elapsed, cpu_used = time.perf_counter() - started, cpu_now() - cpu_before
                if i >= WARM_UP:  # the first rounds warm the connection and the allocator
                    times[name].append(1e3 * elapsed)
                    cpu[name].append(cpu_used)
    explainer.close()
    said = answers["/explain"].json()["predictions"][0]
    return {
        **{name: _stats(times[name], cpu[name]) for name in names},
        "explain_bytes": len(answers["/explain"].content),
        "prediction": said["prediction"],
        "steps": said["steps"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist", choices=pretrained.NAMES)
    parser.add_argument("--repeats", type=int, default=100, help="timed rounds")
    parser.add_argument("--core", type=int, default=1, help="the core the server is pinned to")
    parser.add_argument("--out", type=Path, default=HERE / "results-explain-latency.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()
    measured = measure(args.model, args.core, args.repeats)
    load_after = os.getloadavg()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    record = {
        "command": ("benchmarks/explain_latency.py " + " ".join(sys.argv[1:])).strip(),
        "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "server": f"taskset -c {args.core}, --threads 1 --workers 1",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "torch": torch.__version__,
        "model": args.model,
        "repeats": args.repeats,
        **measured,
    }
    e, p, a = measured["explain"], measured["predict"], measured["explainer_alone"]
    print(
        f"{args.model}: /explain median {e['median_ms']} ms (p10 {e['p10_ms']}, p90 "
        f"{e['p90_ms']}; server CPU {e['cpu_median_ms']} ms), /predict {p['median_ms']} ms "
        f"(CPU {p['cpu_median_ms']}), the explainer alone {a['median_ms']} ms (CPU "
        f"{a['cpu_median_ms']}); {measured['steps']} steps, 1 core of {record['cpu']}, load "
        f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
