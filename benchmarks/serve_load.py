"""Load test of `mnist-resnet serve`: single-image POST /predict on loopback, bounded.

Starts the server in a subprocess on a free 127.0.0.1 port, runs `--concurrency` clients (each
one request at a time) for `--seconds` or `--max-requests`, whichever comes first, and prints
requests/s with p50/p99 latency; the figures go to benchmarks/results-serve.json.

    .venv/bin/python benchmarks/serve_load.py runs/NAME/best.pt
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _digit_png() -> bytes:
    """A drawn-looking "7": black ink on white, 200x200, like a canvas upload."""
    img = np.full((200, 200), 255, np.uint8)
    img[40:55, 50:150] = 0
    for y in range(55, 170):
        x = int(150 - (y - 55) * 0.6)
        img[y, x - 7 : x + 7] = 0
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not become ready")


async def _load(
    url: str, payload: bytes, concurrency: int, seconds: float, max_requests: int
) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    stop = start + seconds
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:

        async def worker() -> None:
            nonlocal errors, issued
            while time.perf_counter() < stop and issued < max_requests:
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/predict", files={"file": ("digit.png", payload, "image/png")}
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=1, help="server inference threads")
    parser.add_argument("--out", type=Path, default=HERE / "results-serve.json")
    args = parser.parse_args()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mnist_resnet", "serve", str(args.checkpoint)]
    cmd += ["--port", str(port), "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        _wait_ready(url, proc)
        payload = _digit_png()
        asyncio.run(_load(url, payload, args.concurrency, 2.0, 10_000))  # warm-up
        latencies, errors, elapsed = asyncio.run(
            _load(url, payload, args.concurrency, args.seconds, args.max_requests)
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if not latencies:
        raise SystemExit(f"no successful requests ({errors} errors)")
    ms = sorted(1e3 * x for x in latencies)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPUs available, no GPU",
        "checkpoint": str(args.checkpoint),
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 2),
        "requests": len(ms),
        "errors": errors,
        "requests_per_s": round(len(ms) / elapsed, 1),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "server_threads": args.threads,
        "payload": "200x200 PNG drawing, preprocessed server-side",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['requests']} requests in {result['seconds']} s, {errors} errors: "
        f"{result['requests_per_s']} requests/s, p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms (concurrency {args.concurrency})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
