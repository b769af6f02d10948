"""Time per update of the draw page's overlay: POST /explain of the page's own request (a
280x280 PNG of a drawn "7", 18 px pen, white on black, as the canvas sends it) against the real
`mnist-resnet serve` pinned to one core with one thread (issue 33: <= 150 ms per update for the
shipped model); /predict of the same request beside it, and the server's explainer alone
(`explain.explain` on its copy of the network, on the same core) for where the time goes.

    .venv/bin/python benchmarks/explain_latency.py [--repeats 100] [--core 1]

The server runs under `taskset -c CORE`, the client on the other cores. The three are timed in
turn, one of each per round, so a change in the machine's other load reaches all three alike.
Prints the medians and writes benchmarks/results-explain-latency.json with the CPU, the load
average before and after (other work on the machine shows there) and the commit.
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

from mnist_resnet import explain, pretrained
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


@contextmanager
def served(model: str, core: int) -> Iterator[httpx.Client]:
    """`mnist-resnet serve --pretrained MODEL` on `core`, one worker, one thread, once ready."""
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
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {
        "median_ms": round(statistics.median(ms), 1),
        "p10_ms": round(ms[len(ms) // 10], 1),
        "p90_ms": round(ms[(9 * len(ms)) // 10], 1),
        "min_ms": round(ms[0], 1),
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

    times: dict[str, list[float]] = {"explain": [], "predict": [], "explainer_alone": []}
    os.sched_setaffinity(0, others)  # the client stays off the server's core
    with served(model, core) as client:
        steps = {
            "explain": post(client, "/explain"),
            "predict": post(client, "/predict"),
            "explainer_alone": alone,
        }
        for i in range(WARM_UP + repeats):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                if i >= WARM_UP:  # the first rounds warm the connection and the allocator
                    times[name].append(1e3 * (time.perf_counter() - started))
    explainer.close()
    said = answers["/explain"].json()["predictions"][0]
    return {
        **{name: _stats(ms) for name, ms in times.items()},
        "explain_bytes": len(answers["/explain"].content),
        "prediction": said["prediction"],
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
        "steps": explain.LIVE_STEPS,
        "repeats": args.repeats,
        **measured,
    }
    e, p, a = measured["explain"], measured["predict"], measured["explainer_alone"]
    print(
        f"{args.model}: /explain median {e['median_ms']} ms (p10 {e['p10_ms']}, p90 "
        f"{e['p90_ms']}), /predict {p['median_ms']} ms, the explainer alone {a['median_ms']} ms; "
        f"{explain.LIVE_STEPS} steps, 1 core of {record['cpu']}, load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
