"""Whether bf16 autocast pays on this CPU: measured by a short training-step probe, then cached.

bf16 halves the bytes every convolution moves, but whether a CPU turns that into speed depends
on its oneDNN kernels: native bf16 dot products (AVX-512-BF16, AMX) can win, emulated ones lose
to fp32. CPUs with the same flags differ (docs/speed.md), so the choice is timed, not guessed:
once per CPU model, torch version, kernel set and thread count, kept in the user's cache folder.

The choice sits above the `Runtime` it configures and the training step it times
(docs/development.md#layers): `make_runtime` is the one place a run's device and precision are
decided.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mnist_resnet.config import ModelConfig
from mnist_resnet.files import atomic_write_text
from mnist_resnet.model import build_model
from mnist_resnet.runtime import Runtime, select_device
from mnist_resnet.step import train_step

CACHE_ENV = "MNIST_RESNET_CACHE_DIR"
CACHE_FILE = "precision.json"
# Bump when the probe itself changes, so that old verdicts are measured again.
PROBE_VERSION = 1
# bf16 must be clearly faster to be chosen: at a tie fp32 wins, being the more exact of the two.
MIN_SPEEDUP = 1.1
# Environment variables that pick other CPU kernels, and so can change the verdict.
_KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


@dataclasses.dataclass(frozen=True)
class Probe:
    """One measurement: median seconds of a training step in fp32 and in bf16 autocast."""

    fp32_seconds: float
    bf16_seconds: float
    # Median over back-to-back (fp32, bf16) pairs of fp32 time / bf16 time: each pair ran
    # under the same machine load, so the ratio holds when the machine's speed drifts.
    speedup: float
    measured: str  # ISO date

    @property
    def bf16_pays(self) -> bool:
        return self.speedup >= MIN_SPEEDUP


def cache_dir() -> Path:
    """$MNIST_RESNET_CACHE_DIR, else $XDG_CACHE_HOME/mnist-resnet, else ~/.cache/mnist-resnet."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mnist-resnet"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def probe_key(channels_last: bool) -> str:
    """What the verdict depends on: the CPU, torch, the kernels it may use, threads, layout."""
    kernels = ",".join(f"{name}={os.environ.get(name, '')}" for name in _KERNEL_ENV)
    capability = torch.backends.cpu.get_cpu_capability()
    layout = "channels_last" if channels_last else "contiguous"
    return (
        f"v{PROBE_VERSION}|{cpu_model()}|torch {torch.__version__}|{capability}|{kernels}|"
        f"{torch.get_num_threads()} threads|{layout}"
    )


def measure(channels_last: bool, *, batch: int = 128, budget_s: float = 0.8) -> Probe:
    """Time the real training step of a ResNet-8, fp32 and bf16 in turn, for about budget_s.

    The global random state is restored afterwards: a run seeded before the probe trains the
    same whether the verdict came from the cache or from this measurement.
    """
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        runtimes = [Runtime(cpu, dtype, channels_last) for dtype in (None, torch.bfloat16)]
        models = [rt.prepare_model(build_model(ModelConfig(depth=8))) for rt in runtimes]
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        times: list[list[float]] = [[], []]

        def step(i: int) -> float:
            start = time.perf_counter()
            train_step(models[i], x, y, optimizers[i], runtimes[i])
            return time.perf_counter() - start

        for i in (0, 1, 0, 1):  # first calls build the kernels: not counted
            step(i)
        deadline = time.perf_counter() + budget_s
        # Alternating, so that a machine that speeds up or slows down affects both alike.
        while len(times[1]) < 3 or (time.perf_counter() < deadline and len(times[1]) < 25):
            for i in (0, 1):
                times[i].append(step(i))
    return Probe(
        statistics.median(times[0]),
        statistics.median(times[1]),
        statistics.median(a / b for a, b in zip(times[0], times[1], strict=True)),
        datetime.date.today().isoformat(),
    )


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _cached(entry: object) -> Probe | None:
    if not isinstance(entry, dict):
        return None
    try:
        probe = Probe(
            float(entry["fp32_seconds"]),
            float(entry["bf16_seconds"]),
            float(entry["speedup"]),
            str(entry["measured"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    ok = all(0 < t < 60 for t in (probe.fp32_seconds, probe.bf16_seconds, probe.speedup))
    return probe if ok else None


def cpu_probe(channels_last: bool) -> tuple[Probe, str]:
    """The cached verdict for this CPU, or a fresh measurement (then cached); and where from."""
    path = cache_dir() / CACHE_FILE
    key = probe_key(channels_last)
    entries = _read_cache(path)
    probe = _cached(entries.get(key))
    if probe is not None:
        return probe, f"cached in {path}"
    probe = measure(channels_last)
    entries[key] = dataclasses.asdict(probe)
    try:
        atomic_write_text(path, json.dumps(entries, indent=2, sort_keys=True) + "\n")
    except OSError:
        return probe, "measured just now; the cache folder is not writable"
    return probe, f"measured just now, cached in {path}"


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # None: full fp32
    reason: str


def choose(device: torch.device, amp: bool | None, channels_last: bool) -> Precision:
    """bf16 autocast or fp32 for `device`: `amp` True/False forces it, None decides.

    Deciding means: on CUDA, bf16 where the GPU supports it; on a CPU, the probe's verdict;
    elsewhere (Apple MPS) fp32.
    """
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            return Precision(None, "fp32: this GPU has no bf16 support")
        if amp is False:
            return Precision(None, "fp32, as set (--no-amp, the preset, or a resumed run)")
        return Precision(
            torch.bfloat16, "bf16 autocast" + (", as set (--amp)" if amp else " on CUDA")
        )
    if device.type != "cpu":
        return Precision(None, f"fp32: bf16 autocast is not used on {device.type}")
    if amp is not None:
        forced = (
            "bf16 autocast, as set (--amp, or the saved config of the run resumed)"
            if amp
            else "fp32, as set (--no-amp, the preset, or the saved config of the run resumed)"
        )
        return Precision(torch.bfloat16 if amp else None, forced)
    probe, source = cpu_probe(channels_last)
    speed = f"a training step ran {probe.speedup:.2f}x as fast as in fp32 on this CPU ({source})"
    if probe.bf16_pays:
        return Precision(torch.bfloat16, f"bf16 autocast: {speed}; --no-amp forces fp32")
    return Precision(None, f"fp32: in bf16 autocast {speed}; --amp forces bf16")


def make_runtime(*, accel: bool, amp: bool | None, channels_last: bool) -> Runtime:
    """The device, precision and layout to run on.

    `amp` True/False forces bf16 autocast on or off; None lets `choose` decide (on a
    CPU by a cached measurement), and `Runtime.precision_note` says which and why.
    """
    device = select_device(accel)
    chosen = choose(device, amp, channels_last)
    return Runtime(device, chosen.dtype, channels_last, precision_note=chosen.reason)
