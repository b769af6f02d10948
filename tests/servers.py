"""A real `mnist-resnet serve` process (Granian and its worker) for tests that need sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_status(port: int, path: str = "/readyz", timeout: float = 5.0) -> int | None:
    """The status code of one GET over a fresh connection; None when it cannot connect."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            return int(s.recv(64)[9:12])
    except (OSError, ValueError):
        return None


@contextmanager
def served(
    checkpoint: Path, *flags: str, ready_within: float = 180.0, log: Path | None = None
) -> Iterator[Served]:
    """The server on a free port, yielded once /readyz answers 200; stopped (SIGTERM) after.

    `log`: a file that receives everything the server writes (stdout and stderr)."""
    port = free_port()
    argv = [sys.executable, "-m", "mnist_resnet", "serve", str(checkpoint), "--port", str(port)]
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([*argv, *flags], stdout=out, stderr=subprocess.STDOUT if log else None)
    try:
        deadline = time.monotonic() + ready_within
        while get_status(port, timeout=2.0) != 200:
            assert proc.poll() is None, f"the server exited with code {proc.returncode}"
            assert time.monotonic() < deadline, "the server did not become ready"
            threading.Event().wait(0.1)
        yield Served(f"http://127.0.0.1:{port}", port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is not None:
            out.close()  # type: ignore[union-attr]


def children(pid: int) -> set[int]:
    """The process ids of a process's children (Granian's workers and multiprocessing's helper)."""
    try:
        return {
            int(c)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()
        }
    except OSError:
        return set()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not collected it


def wait_for(condition: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until `condition()` holds, checked every 20 ms; fails after `within` seconds."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"{what}: not within {within:g} s"
        threading.Event().wait(0.02)
    return time.monotonic() - started


def tree_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KB summed over a process and its descendants (Granian's workers)."""
    totals = {"VmRSS": 0, "VmHWM": 0}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
            children = [
                int(c)
                for task in Path(f"/proc/{p}/task").iterdir()
                for c in (task / "children").read_text().split()
            ]
        except OSError:
            continue
        for key, _, value in (line.partition(":") for line in lines):
            if key in totals:
                totals[key] += int(value.split()[0])
        todo += children
    return totals
