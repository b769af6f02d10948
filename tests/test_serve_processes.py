"""serve as a real `--workers 2` process tree: dead workers, a dead supervisor, slow and odd
clients, one metrics view, memory after a burst (docs/reliability.md, "The server").

One server is shared by the tests that leave it running; the test that kills processes starts
its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("granian", reason="the serve extra (fastapi, granian) is not installed")
import httpx
from servers import Served, alive, children, get_status, served, tree_status, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)"),
]

SMALL = json.dumps({"images": [[[0] * 28] * 28], "top_k": 1}).encode()
JSON = {"content-type": "application/json"}


def _ready_workers(log: Path) -> list[int]:
    return [int(p) for p in re.findall(rb"worker (\d+) ready", log.read_bytes())]


def _metric(server: Served, name: str) -> dict[str, float]:
    """Each sample of one metric family from /metrics (over a fresh connection), by labels."""
    text = httpx.get(server.url + "/metrics", headers={"connection": "close"}).text
    return {
        line.split(" ")[0][len(name) :]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name)
    }


@pytest.fixture(scope="module")
def server(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with served(small_checkpoint, "--workers", "2", log=log) as s:
        # Both, so that no start-up line lands among those a test counts.
        wait_for(lambda: len(_ready_workers(log)) == 2, 180, "both workers ready")
        s.log = log  # type: ignore[attr-defined]
        yield s


def _raw(port: int, request: bytes, *, answer: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        return s.recv(65536) if answer else b""


def test_odd_requests_get_a_4xx_and_one_log_line_each(server: Served) -> None:
    log: Path = server.log  # type: ignore[attr-defined]
    logged = len(log.read_bytes().splitlines())
    chunked = (
        b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    for size in (b"zz", b"-5", b"f" * 18):  # chunk sizes that are not hex, negative, huge
        assert _raw(server.port, chunked + size + b'\r\n{"images"\r\n').startswith(b"HTTP/1.1 400")
    two_hosts = b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n"
    assert _raw(server.port, two_hosts).startswith(b"HTTP/1.1 400")
    head = _raw(server.port, b"HEAD /model HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")  # headers only
    # 20 clients that leave in the middle of their bodies.
    declared = (
        b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100000\r\n\r\n{"images": [[[0, 0'
    )
    for _ in range(20):
        _raw(server.port, declared, answer=False)
    top_k = {"top_k": "9" * 4301}  # beyond Python's int() conversion limit
    answer = httpx.post(server.url + "/predict", files={"file": ("a.png", b"x")}, data=top_k)
    assert answer.status_code == 422
    failed = 3 + 1 + 20 + 1
    wait_for(lambda: len(log.read_bytes().splitlines()) >= logged + failed, 10, "log lines")
    lines = log.read_bytes().splitlines()[logged:]
    assert len(lines) == failed, lines  # one line per failed request, nothing else
    assert not any(b"Traceback" in line or b'File "' in line for line in lines), lines
    assert sum(b"request body incomplete" in line for line in lines) == 23
    codes = _metric(server, "mnist_resnet_responses_total")
    assert '{code="500"}' not in codes, codes


def test_one_metrics_view_for_all_workers(server: Served) -> None:
    before = _metric(server, "mnist_resnet_responses_total").get('{code="415"}', 0.0)
    for _ in range(20):  # fresh connections: both workers answer some
        wrong = httpx.post(server.url + "/predict", content=b"x", headers={"connection": "close"})
        assert wrong.status_code == 415

    def counted() -> float:
        return _metric(server, "mnist_resnet_responses_total")['{code="415"}']

    # A response is counted just after it is sent: the last one may still be on its way.
    wait_for(lambda: counted() == before + 20, 10, "all 20 counted")
    seen = [counted() for _ in range(12)]
    assert seen == [before + 20] * 12, seen  # every scrape, whichever worker, sees them all


def test_slow_uploads_hold_no_place_of_a_real_request(server: Served) -> None:
    """256 clients that declare 100 KB bodies and send one byte (far more than the 2 x 32
    admission places): real requests are answered as usual (the issue's target: p99 <= 1 s)."""
    slow = []
    in_flight = "mnist_resnet_requests_in_flight"
    head = (
        b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{"
    )
    try:
        for _ in range(256):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            s.sendall(head)
            slow.append(s)
        wait_for(lambda: _metric(server, in_flight)[""] >= 256, 30, "slow clients in flight")

        def timed(_: int) -> float:
            started = time.monotonic()
            answer = httpx.post(server.url + "/predict", content=SMALL, headers=JSON, timeout=60)
            assert answer.status_code == 200, answer.text
            return time.monotonic() - started

        with ThreadPoolExecutor(4) as pool:
            seconds = sorted(pool.map(timed, range(100)))
        assert _metric(server, in_flight)[""] >= 256  # the slow clients were there throughout
        assert seconds[98] <= 1.0, seconds[-5:]
    finally:
        for s in slow:
            s.close()
        # Each is answered (400, body incomplete) and logged before the next test looks.
        wait_for(lambda: _metric(server, in_flight)[""] <= 1, 30, "slow clients gone")


def test_memory_goes_back_after_a_burst_of_large_json_bodies(server: Served) -> None:
    # 2.6 million numbers in 5 MB: a client's mistake (one row too many) parsed in full before
    # the shape is refused, so each body becomes millions of Python objects for a moment.
    row = "[" + ",".join(["0"] * 2000) + "]"
    body = ('{"images": [[' + ",".join([row] * 1300) + "]]}").encode()
    assert 5_000_000 < len(body) < 5 * 1024 * 1024
    for _ in range(4):
        httpx.post(server.url + "/predict", content=SMALL, headers=JSON)
    idle = tree_status(server.proc.pid)["VmRSS"]

    def post(_: int) -> int:
        answer = httpx.post(server.url + "/predict", content=body, headers=JSON, timeout=120)
        return answer.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(post, range(16)))
    assert codes == [422] * 16, codes
    # KB, every process of the server: within 200 MB of idle once the freed memory is handed
    # back (a background trim after each large body: waited for, not slept on).
    wait_for(lambda: tree_status(server.proc.pid)["VmRSS"] < idle + 200_000, 20, "memory back")


def test_dead_workers_are_replaced_and_a_dead_supervisor_takes_its_workers(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with served(small_checkpoint, "--workers", "2", log=log) as server:
        wait_for(lambda: len(_ready_workers(log)) == 2, 180, "both workers ready")
        first, second = _ready_workers(log)
        failures: list[str] = []
        done = threading.Event()

        def load() -> None:  # keeps requests in flight throughout
            with httpx.Client(timeout=30) as client:
                while not done.is_set():
                    try:
                        client.post(server.url + "/predict", content=SMALL, headers=JSON)
                    except httpx.HTTPError as e:
                        failures.append(type(e).__name__)

        clients = [threading.Thread(target=load) for _ in range(4)]
        for c in clients:
            c.start()
        try:
            os.kill(first, signal.SIGKILL)
            answered = wait_for(lambda: get_status(server.port) == 200, 2.0, "answering")
            wait_for(lambda: len(_ready_workers(log)) == 3, 180, "a replacement worker ready")
            replacement = _ready_workers(log)[2]
            assert replacement in children(server.proc.pid) and not alive(first)
            # The second original worker too: the replacement alone answers.
            os.kill(second, signal.SIGKILL)
            wait_for(lambda: not alive(second), 10, "second worker gone")
            answered = max(answered, wait_for(lambda: get_status(server.port) == 200, 2.0, "up"))
        finally:
            done.set()
            for c in clients:
                c.join()
        # Only requests on the killed workers' connections failed: one per client each time.
        assert len(failures) <= 2 * len(clients), failures
        assert server.proc.poll() is None and answered < 2.0
        # The supervisor killed outright: its workers stop (the kernel tells them) and the port
        # is free for a new server.
        workers = [w for w in children(server.proc.pid) if w != replacement] + [replacement]
        server.proc.kill()
        server.proc.wait()
        wait_for(lambda: not any(alive(w) for w in workers), 30, "no orphaned worker")
        socket.create_server(("127.0.0.1", server.port)).close()
        # Its metrics folder is left (nobody could remove it): the next server removes it.
        from mnist_resnet.serve.process import METRICS_PREFIX, _metrics_folder

        left = list(Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}{server.proc.pid}-*"))
        assert len(left) == 1
        shutil.rmtree(_metrics_folder())
        assert not left[0].exists()


def test_the_metrics_folder_of_a_killed_supervisor_is_removed_by_the_next(tmp_path: Path) -> None:
    from mnist_resnet.serve.process import METRICS_PREFIX, _metrics_folder

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{METRICS_PREFIX}{dead.pid}-abc"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"x")
    running = tmp_path / f"{METRICS_PREFIX}{os.getpid()}-def"
    running.mkdir()
    fresh = Path(_metrics_folder(tmp_path))
    assert fresh.is_dir() and fresh.name.startswith(f"{METRICS_PREFIX}{os.getpid()}-")
    assert not stale.exists() and running.is_dir()
