"""benchmarks/serve_load.py stopped by Ctrl-C or SIGTERM leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "serve_load.py"
SHIPPED = REPO / "src" / "mnist_resnet" / "pretrained" / "mnist.safetensors"


def _alive(pid: int) -> bool:
    """The process, or anything in the process group it leads, still exists."""
    for kill in (os.kill, os.killpg):
        try:
            kill(pid, 0)
            return True
        except ProcessLookupError:
            pass
    return False


def _sigint_as_in_a_terminal() -> None:
    """Runs in the child before it starts: a suite started in the background (`&`, nohup)
    passes SIGINT on ignored, and Python then never turns it into KeyboardInterrupt; the
    foreground job a terminal's Ctrl-C reaches has the default, as here."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _worktrees() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "worktree", "list", "--porcelain"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout"
)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_load_test_stops_its_servers_and_removes_its_worktree(
    sig: signal.Signals,
) -> None:
    """Stopped while both servers start (the moment with the most to undo): exit 130, both
    server process groups gone, the baseline worktree removed from disk and from git."""
    argv = [sys.executable, str(SCRIPT), str(SHIPPED), "--baseline", "HEAD"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    assert proc.stdout is not None
    servers: list[int] = []
    tree: Path | None = None
    try:
        for line in proc.stdout:
            if line.startswith("baseline worktree: "):
                tree = Path(line.split(": ", 1)[1].strip())
            started = re.match(r"started the .* server \(pid (\d+)\)", line)
            if started:
                servers.append(int(started[1]))
            if len(servers) == 2:
                break
        assert tree is not None and len(servers) == 2, proc.stderr.read() if proc.stderr else ""
        assert tree.is_dir() and str(tree) in _worktrees()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert not [pid for pid in servers if _alive(pid)]
        assert not tree.exists() and str(tree) not in _worktrees()
    finally:  # whatever the script left: ended here, so that a failure leaves nothing either
        proc.kill()
        proc.wait()
        for pid in servers:
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError):
                    kill(pid, signal.SIGKILL)
        if tree is not None and tree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)  # fmt: skip
            subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)
