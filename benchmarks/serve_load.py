"""Side-by-side load test of `mnist-resnet serve`: this tree's server against a baseline commit's.

Both servers run at once on free 127.0.0.1 ports (the baseline from a `git worktree` of
`--baseline`, sharing this virtual environment). Phases alternate between them: for each round,
each payload (a 200x200 PNG drawing as a multipart upload; a 28x28 JSON pixel array), each
server, a load generator in a separate process keeps `--concurrency` keep-alive connections busy
for `--seconds`, one request at a time each, and reports requests/s and p50/p99 latency; the
servers' resident memory (all their processes) is sampled during and after. Then the lock-out
check: `--idle` connections that send nothing and as many that stop mid-header, with single
requests timed at 1, 10 and 30 s. Results go to benchmarks/results-serve.json.
Ctrl-C, SIGTERM or SIGHUP stop both servers (each in a session of its own, workers included)
and remove the baseline worktree before the script exits with 130.

    .venv/bin/python benchmarks/serve_load.py runs/NAME/best.pt --baseline 3c5b168
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BOUNDARY = "mnistresnetbench"


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


def _request(kind: str, port: int) -> bytes:
    """The whole HTTP/1.1 request, built once: the generator only writes and reads bytes."""
    if kind == "png":
        body = (
            (
                f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=file; filename=seven.png\r\n"
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + _digit_png()
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        kind_header = f"multipart/form-data; boundary={BOUNDARY}"
    else:
        digit = np.zeros((28, 28), np.uint8)
        digit[5:8, 6:22] = 255
        for y in range(8, 24):
            digit[y, 20 - (y - 8) // 2 : 23 - (y - 8) // 2] = 255
        body = json.dumps({"images": [digit.tolist()]}).encode()
        kind_header = "application/json"
    head = (
        f"POST /predict HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: {kind_header}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _client(
    port: int, request: bytes, stop: float, latencies: list[float], codes: Counter[str]
) -> None:
    reader = writer = None
    while time.perf_counter() < stop:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            codes[head[9:12].decode()] += 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            codes[type(e).__name__] += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _generate(port: int, kind: str, concurrency: int, seconds: float) -> dict[str, Any]:
    request = _request(kind, port)
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    start = time.perf_counter()
    stop = start + seconds
    await asyncio.gather(
        *(_client(port, request, stop, latencies, codes) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - start
    ms = sorted(1e3 * x for x in latencies)
    return {
        "requests": len(ms),
        "codes": dict(codes),
        "requests_per_s": round(codes.get("200", 0) / elapsed, 1),
        "p50_ms": round(statistics.median(ms), 1) if ms else None,
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1) if ms else None,
    }


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Granian's workers), in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(status.split("VmRSS:")[1].split()[0])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError):
            continue
    return round(total / 1024, 1)


class Server:
    def __init__(self, name: str, src: Path, checkpoint: Path, extra: list[str]) -> None:
        self.name = name
        self.port = _free_port()
        self.src, self.checkpoint, self.extra = src, checkpoint, extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.src)}
        cmd = [sys.executable, "-m", "mnist_resnet", "serve", str(self.checkpoint)]
        # A session of its own: `stop` ends the server and its workers as one group, and a
        # Ctrl-C in the terminal reaches only this script, which then stops them in order.
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port), *self.extra],
            env=env,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        print(f"started the {self.name} server (pid {self.proc.pid})", flush=True)

    def wait_ready(self, timeout: float = 120) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} server exited with code {self.proc.returncode}")
            if _get(self.port, "/health") == 200:
                return
            time.sleep(0.2)
        raise SystemExit(f"{self.name} server did not become ready")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left of it after 20 s."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break  # the whole group is gone
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(self.proc.pid):
                break
        self.proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _get(port: int, path: str, timeout: float = 5.0) -> int | str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            return int(s.recv(64)[9:12])
    except (OSError, ValueError) as e:
        return type(e).__name__


def _load_phase(server: Server, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    assert server.proc is not None
    pid = server.proc.pid
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append(_tree_rss_mb(pid))

    # A daemon, and told to end in any case: an interrupted phase must not keep the script.
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cmd = [sys.executable, __file__, "--generate", str(server.port), kind]
    cmd += [str(args.concurrency), str(args.seconds)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        done.set()
    sampler.join()
    result: dict[str, Any] = json.loads(out)
    time.sleep(2.0)  # then how much the server kept
    result["rss_peak_mb"] = max(samples, default=None)
    result["rss_after_mb"] = _tree_rss_mb(pid)
    return result


def _lockout_phase(server: Server, idle: int) -> list[dict[str, Any]]:
    """`idle` silent connections and `idle` that stop mid-header, then timed single requests."""
    held = []
    for i in range(2 * idle):
        try:
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        except OSError:
            break
        if i % 2:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\n")
        held.append(s)
    start = time.monotonic()
    probes = []
    for at in (1.0, 10.0, 30.0):
        time.sleep(max(0.0, start + at - time.monotonic()))
        t0 = time.perf_counter()
        code = _get(server.port, "/health", timeout=20)
        probes.append({"at_s": at, "status": code, "ms": round(1e3 * (time.perf_counter() - t0))})
    open_left = 0
    for s in held:
        s.setblocking(False)
        try:
            open_left += s.recv(1) != b""
        except BlockingIOError:
            open_left += 1
        except OSError:
            pass
        s.close()
    probes.append({"held": len(held), "still_open_after_30_s": open_left})
    return probes


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP unwind like Ctrl-C: the cleanup runs


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """While cleaning up: a second Ctrl-C must not cut the servers' stop or the removal short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _git(*argv: str, check: bool = False) -> None:
    subprocess.run(["git", "-C", str(REPO), *argv], check=check, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--baseline", default="3c5b168", help="commit of the server to compare")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle", type=int, default=128, help="lock-out: connections of each kind")
    parser.add_argument("--new-args", default="", help="extra flags for this tree's server")
    parser.add_argument("--out", type=Path, default=HERE / "results-serve.json")
    args = parser.parse_args()
    for sig in STOP_SIGNALS[1:]:
        signal.signal(sig, _interrupt)
    try:
        phases, lockout = _measure(args)
    except KeyboardInterrupt:
        print("interrupted: both servers stopped, the baseline worktree removed", file=sys.stderr)
        return 130
    _write_results(args, phases, lockout)
    return 0


def _measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start the baseline worktree and both servers, run the phases; whatever happens (an
    error, Ctrl-C, SIGTERM), stop the servers and remove the worktree before returning."""
    stack = ExitStack()
    try:
        # Registered first, so run last: forget a worktree whose folder is already gone.
        stack.callback(_git, "worktree", "prune")
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-baseline-")))
        tree = tmp / "tree"
        stack.callback(_git, "worktree", "remove", "--force", str(tree))
        _git("worktree", "add", "--detach", str(tree), args.baseline, check=True)
        print(f"baseline worktree: {tree}", flush=True)
        servers = [
            Server("baseline", tree / "src", args.checkpoint, []),
            Server("this tree", REPO / "src", args.checkpoint, args.new_args.split()),
        ]
        for server in servers:
            stack.callback(server.stop)  # before it starts: no moment leaves it unowned
            server.start()
        for server in servers:
            assert server.proc is not None
            server.wait_ready()
            idle_rss = _tree_rss_mb(server.proc.pid)
            print(f"{server.name}: ready on port {server.port}, {idle_rss} MB resident")
        phases: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            for kind in ("png", "json"):
                order = servers if round_ % 2 == 0 else servers[::-1]
                for server in order:
                    r = _load_phase(server, kind, args)
                    phases.append({"server": server.name, "payload": kind, **r})
                    print(
                        f"round {round_ + 1} {kind:4} {server.name:9}: {r['requests_per_s']:7.1f}"
                        f" req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, codes {r['codes']},"
                        f" RSS peak {r['rss_peak_mb']} MB, after {r['rss_after_mb']} MB",
                        flush=True,
                    )
        lockout = {}
        for server in servers:
            lockout[server.name] = _lockout_phase(server, args.idle)
            print(f"lock-out, {server.name}: {lockout[server.name]}", flush=True)
    finally:
        with _signals_ignored():
            stack.close()
    return phases, lockout


def _write_results(
    args: argparse.Namespace, phases: list[dict[str, Any]], lockout: dict[str, Any]
) -> None:
    summary: dict[str, Any] = {}
    for kind in ("png", "json"):
        for name in ("baseline", "this tree"):
            rows = [p for p in phases if p["server"] == name and p["payload"] == kind]
            summary[f"{kind} {name}"] = {
                "requests_per_s": statistics.median(p["requests_per_s"] for p in rows),
                "p50_ms": statistics.median(p["p50_ms"] for p in rows),
                "p99_ms": statistics.median(p["p99_ms"] for p in rows),
                "rss_peak_mb": max(p["rss_peak_mb"] for p in rows),
            }
        ratio = summary[f"{kind} this tree"]["requests_per_s"] / max(
            summary[f"{kind} baseline"]["requests_per_s"], 1e-9
        )
        summary[f"{kind} ratio"] = round(ratio, 2)
        print(f"{kind}: this tree / baseline requests/s = {ratio:.2f}x (medians of rounds)")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPUs available, no GPU",
        "checkpoint": args.checkpoint.name,
        "baseline": args.baseline,
        "new_args": args.new_args,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "summary": summary,
        "phases": phases,
        "lockout": lockout,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--generate":
        port, kind, concurrency, seconds = sys.argv[2:]
        print(json.dumps(asyncio.run(_generate(int(port), kind, int(concurrency), float(seconds)))))
        raise SystemExit(0)
    raise SystemExit(main())
