"""Running the server: Granian's supervisor and worker processes, the settings they share, the
metrics folder, and the workers' tie to their supervisor.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import (
    multiprocess,
)

from mnist_resnet.checkpoint import load_model
from mnist_resnet.config import ConfigError, ServeConfig, from_dict, to_dict
from mnist_resnet.errors import printable
from mnist_resnet.runtime import return_freed_memory
from mnist_resnet.serve.app import create_app
from mnist_resnet.serve.metrics import MULTIPROC_ENV

# How `serve` hands its settings to Granian's worker processes, which build the app themselves.
SETTINGS_ENV = "MNIST_RESNET_SERVE"


def app_from_environment() -> FastAPI:
    """Granian's factory: each worker process builds the app from the settings `serve` left in
    the environment."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    _exit_with(settings["supervisor"])
    _forget_dead_workers()
    return_freed_memory()  # after a burst of large uploads the memory goes back to the OS
    config = from_dict(ServeConfig, settings["config"])
    app = create_app(Path(settings["checkpoint"]), config)
    # The objects made so far (torch, the model, the app) live as long as the process: frozen,
    # they are no longer scanned by every full garbage collection, which otherwise paused
    # requests for tens of milliseconds under load.
    gc.collect()
    gc.freeze()
    # One line per worker start: after a replacement, the log says when it took over.
    print(f"mnist-resnet: worker {os.getpid()} ready", file=sys.stderr, flush=True)
    return app


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_with(supervisor: int) -> None:
    """Have the kernel kill this worker when its supervisor dies, even by SIGKILL: orphaned
    workers would otherwise keep the port (Linux only). SIGKILL, not SIGTERM: a worker still
    starting may not act on SIGTERM (docs/reliability.md), and a supervisor killed outright
    loses in-flight requests anyway."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _forget_dead_workers() -> None:
    """Drop the in-flight gauges of worker processes that no longer run (a killed worker's
    requests are not in flight any more); their counters stay, so totals never go back."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass


METRICS_PREFIX = "mnist-resnet-metrics-"


def _metrics_folder(parent: Path | None = None) -> str:
    """A new folder for the workers' metric files, named after this (the supervisor's) process;
    the folders of supervisors that no longer run (killed before they could remove theirs) are
    removed first."""
    parent = parent or Path(tempfile.gettempdir())
    for old in parent.glob(f"{METRICS_PREFIX}*-*"):
        pid = old.name[len(METRICS_PREFIX) :].split("-")[0]
        try:
            mine = old.stat().st_uid == os.getuid()
            if mine and pid.isdigit():
                os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another user's process, or gone meanwhile
            pass
    return tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-", dir=parent)


def start(checkpoint: Path, config: ServeConfig, *, shown: str) -> None:
    """`mnist-resnet serve`: the model file and the address checked here, once, in one line
    each (the workers load the model again, and a bad file there would only be a dead worker),
    then `serve`. `shown` names the model in the line that says where it is served."""
    load_model(checkpoint)
    try:  # a port in use (or a host not on this machine) is one line, not the server's exit
        socket.create_server((config.host, config.port)).close()
    except OSError as e:
        where = f"{config.host}:{config.port}"
        raise ConfigError(f"cannot listen on {where}: {e.strerror or e}") from None
    if config.host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        # The address it was told to bind is a name clients will use.
        hosts = (*config.allowed_hosts, config.host)
        config = dataclasses.replace(config, allowed_hosts=hosts)
    workers = f"{config.workers} worker{'s' if config.workers > 1 else ''}"
    address = f"http://{config.host}:{config.port}/"
    print(f"serving {printable(shown)} on {address} ({workers}; Ctrl-C stops)")
    serve(checkpoint, config)


def serve(checkpoint: Path, config: ServeConfig) -> None:
    """Run the app under Granian until interrupted (Ctrl-C or SIGTERM).

    A worker that dies (killed, out of memory) is replaced while the others go on answering;
    the workers stop when the supervisor does, however it ends."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    metrics_dir = _metrics_folder()
    settings = {
        "checkpoint": str(checkpoint.resolve()),
        "config": to_dict(config),
        "supervisor": os.getpid(),
    }
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    os.environ[MULTIPROC_ENV] = metrics_dir
    # Fresh worker processes: a fork of this one (which has used torch, so its OpenMP pool
    # exists) hangs at its first parallel kernel.
    multiprocessing.set_start_method("spawn", force=True)
    server = Server(
        "mnist_resnet.serve:app_from_environment",
        factory=True,
        interface=Interfaces.ASGI,
        address=config.host,
        port=config.port,
        workers=config.workers,
        http=HTTPModes.http1,
        websockets=False,
        # Connections served at once per worker (idle ones too, until the header timeout).
        backpressure=config.max_connections,
        http1_settings=HTTP1Settings(header_read_timeout=round(config.header_timeout_s * 1000)),
        log_level=LogLevels.warning,
        # A dead worker is replaced (Granian gives up if the same one dies again within 5.5 s of
        # its start, rather than crash-looping).
        respawn_failed_workers=True,
    )
    try:
        server.serve()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
